//! The TOML job spec: what a data scientist submits with `confide job submit`.
//!
//! [`JobSpec::parse`] reads the TOML into [`RawJobSpec`] (every setting
//! optional, as written), reports *every* error it can find, each as
//! `FILE: field.path: what is wrong`, and only then builds the typed
//! [`JobSpec`], whose strategy, model and aggregation protocol are tagged
//! enums with exactly their own settings. A bad spec is fixed in one pass and
//! never reaches a party. See `examples/jobs/breast-cancer.toml` for a
//! commented example.

use std::collections::BTreeMap;
use std::fmt;

use confide_algorithms::{Capabilities, Engine, ModelConfig, OptimizerKind, RawModel, TrainConfig};
use confide_crypto::aggregation::{JobFacts, Protocols, Reveals};
use serde::{Deserialize, Serialize};

use crate::Limits;
use crate::dpspec::{DpSpec, RawDp};
use crate::pipeline::{IncrementalSpec, PipelineRef};

/// What a job does. The built-in kinds are variants; a kind registered by a
/// coordinator and party build of your own is [`JobKind::Extension`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Federated training for `rounds` rounds.
    Train,
    /// One federated evaluation of an earlier job's model (`from_job`).
    Evaluate,
    /// An incremental learning pipeline (see [`crate::pipeline`]).
    Incremental,
    /// A kind registered by name (see `docs/architecture.md`).
    Extension(String),
}

impl JobKind {
    /// The name used in specs, policies and status.
    pub fn as_str(&self) -> &str {
        match self {
            JobKind::Train => "train",
            JobKind::Evaluate => "evaluate",
            JobKind::Incremental => "incremental",
            JobKind::Extension(name) => name,
        }
    }

    /// The kind called `name`.
    pub fn parse(name: &str) -> JobKind {
        match name {
            "train" => JobKind::Train,
            "evaluate" => JobKind::Evaluate,
            "incremental" => JobKind::Incremental,
            other => JobKind::Extension(other.to_owned()),
        }
    }
}

/// A table's check message (`field: reason`, relative to the table) as
/// the spec's (path, reason).
fn in_table(table: &str, msg: &str) -> (String, String) {
    let (field, rest) = msg.split_once(": ").unwrap_or(("", msg));
    (format!("{table}.{field}"), rest.to_owned())
}

/// Which parties take part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartiesSpec {
    /// Named parties; empty means "any enrolled party that is connected".
    #[serde(default)]
    pub names: Vec<String>,
    /// Fewest parties that must answer each stage for the job to go on.
    /// Defaults to the number of named parties.
    #[serde(default)]
    pub min: Option<usize>,
    /// The data set name each party looks up in its own config.
    pub dataset: String,
    /// Per-party overrides of `dataset`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub datasets: BTreeMap<String, String>,
}

/// Settings of the adaptive server optimisers (Reddi et al., ICLR 2021).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveSettings {
    /// Server learning rate η (default 0.1).
    pub server_learning_rate: f64,
    /// β₁ (default 0.9).
    pub beta1: f64,
    /// β₂ (default 0.99; unused by Adagrad).
    pub beta2: f64,
    /// Adaptivity τ (default 1e-3).
    pub tau: f64,
}

/// The aggregation strategy, with exactly its own settings (defaults filled in).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StrategyConfig {
    /// Example-weighted federated averaging.
    FedAvg,
    /// FedAvg with the proximal term μ/2·‖w − w_global‖² in local training.
    FedProx {
        /// μ (default 0.01).
        proximal_mu: f64,
    },
    /// FedAvg with server momentum.
    FedAvgM {
        /// η (default 1.0).
        server_learning_rate: f64,
        /// β (default 0.9).
        momentum: f64,
    },
    /// Adaptive server optimiser: Adagrad.
    FedAdagrad(AdaptiveSettings),
    /// Adaptive server optimiser: Yogi.
    FedYogi(AdaptiveSettings),
    /// Adaptive server optimiser: Adam.
    FedAdam(AdaptiveSettings),
    /// Coordinate-wise median (robust; needs individual updates).
    Median,
    /// Coordinate-wise trimmed mean (robust; needs individual updates).
    TrimmedMean {
        /// Fraction trimmed at each end, [0, 0.5) (default 0.1).
        trim_fraction: f64,
    },
    /// Krum (robust; needs individual updates).
    Krum {
        /// Byzantine parties tolerated (default 1).
        byzantine: usize,
    },
    /// A strategy registered with the coordinator by a build of your own
    /// (see `examples/custom_strategy.rs`).
    Custom {
        /// The registered name.
        name: String,
        /// Its options table, handed to the registered factory.
        options: toml::Table,
    },
}

impl StrategyConfig {
    /// The name used in specs (`custom` for registered strategies).
    pub fn name(&self) -> &'static str {
        match self {
            StrategyConfig::FedAvg => "fedavg",
            StrategyConfig::FedProx { .. } => "fedprox",
            StrategyConfig::FedAvgM { .. } => "fedavgm",
            StrategyConfig::FedAdagrad(_) => "fedadagrad",
            StrategyConfig::FedYogi(_) => "fedyogi",
            StrategyConfig::FedAdam(_) => "fedadam",
            StrategyConfig::Median => "median",
            StrategyConfig::TrimmedMean { .. } => "trimmed_mean",
            StrategyConfig::Krum { .. } => "krum",
            StrategyConfig::Custom { .. } => "custom",
        }
    }

    /// What a built-in strategy can aggregate; `None` for a custom one,
    /// which declares it when built.
    pub fn capabilities(&self) -> Option<Capabilities> {
        match self {
            StrategyConfig::Median | StrategyConfig::TrimmedMean { .. } | StrategyConfig::Krum { .. } => {
                Some(Capabilities::INDIVIDUAL_UPDATES)
            }
            StrategyConfig::Custom { .. } => None,
            _ => Some(Capabilities::ANY),
        }
    }
}

/// The strategy table as written in TOML.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStrategy {
    /// Which strategy (default `fedavg`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// fedavgm / fedad*: server learning rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// fedavgm: server momentum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// fedad*: β₁.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// fedad*: β₂.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// fedad*: τ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// trimmed_mean: trimmed fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_fraction: Option<f64>,
    /// fedprox: μ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proximal_mu: Option<f64>,
    /// krum: Byzantine parties tolerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<usize>,
    /// custom: the registered strategy's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<String>,
    /// custom: options for the registered strategy.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub options: toml::Table,
}

const STRATEGIES: [&str; 10] =
    ["fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "median", "trimmed_mean", "krum", "custom"];

impl RawStrategy {
    /// Checks every setting against the named strategy; errors are
    /// `(field, message)` relative to the table.
    fn validate(&self, min_parties: usize) -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = Vec::new();
        let name = self.name.as_deref().unwrap_or("fedavg");
        if !STRATEGIES.contains(&name) {
            e.push(("name".into(), format!("unknown strategy {name:?} (one of {})", STRATEGIES.join(", "))));
            return e;
        }
        let adaptive = ["fedadagrad", "fedyogi", "fedadam"];
        // Which strategies each setting applies to.
        let fields: [(&str, bool, &[&str]); 10] = [
            (
                "server_learning_rate",
                self.server_learning_rate.is_some(),
                &["fedavgm", "fedadagrad", "fedyogi", "fedadam"],
            ),
            ("momentum", self.momentum.is_some(), &["fedavgm"]),
            ("beta1", self.beta1.is_some(), &adaptive),
            ("beta2", self.beta2.is_some(), &adaptive),
            ("tau", self.tau.is_some(), &adaptive),
            ("trim_fraction", self.trim_fraction.is_some(), &["trimmed_mean"]),
            ("proximal_mu", self.proximal_mu.is_some(), &["fedprox"]),
            ("byzantine", self.byzantine.is_some(), &["krum"]),
            ("custom", self.custom.is_some(), &["custom"]),
            ("options", !self.options.is_empty(), &["custom"]),
        ];
        let mut misplaced = Vec::new();
        for (field, set, applies) in fields {
            if set && !applies.contains(&name) {
                misplaced.push(field);
                let to = if applies.len() == 1 { format!("name = {:?}", applies[0]) } else { applies.join(", ") };
                e.push((field.into(), format!("only applies to {to}")));
            }
        }
        let ok = |f: &str| !misplaced.contains(&f);
        let in01 = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && (0.0..1.0).contains(&v));
        if ok("server_learning_rate") && self.server_learning_rate.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            e.push(("server_learning_rate".into(), "must be positive and finite".into()));
        }
        for (field, v) in [("momentum", self.momentum), ("beta1", self.beta1), ("beta2", self.beta2)] {
            if ok(field) && !in01(v) {
                e.push((field.into(), "must be in [0, 1)".into()));
            }
        }
        if ok("tau") && self.tau.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            e.push(("tau".into(), "must be positive and finite".into()));
        }
        if ok("proximal_mu") && self.proximal_mu.is_some_and(|v| !(v.is_finite() && (0.0..=1000.0).contains(&v))) {
            e.push(("proximal_mu".into(), "must be in [0, 1000]".into()));
        }
        if ok("trim_fraction") && self.trim_fraction.is_some_and(|v| !(v.is_finite() && (0.0..0.5).contains(&v))) {
            e.push(("trim_fraction".into(), "must be in [0, 0.5)".into()));
        }
        if name == "custom" {
            match &self.custom {
                None => e.push(("custom".into(), "name the registered strategy (name = \"custom\")".into())),
                Some(c)
                    if c.is_empty()
                        || c.len() > 64
                        || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch)) =>
                {
                    e.push(("custom".into(), format!("{c:?} is not a strategy name (letters, digits, '-', '_')")))
                }
                Some(_) => {}
            }
            if let Some(k) = self.options.keys().find(|k| k.is_empty() || k.len() > 64) {
                e.push((format!("options.{k}"), "option names are 1 to 64 bytes".into()));
            }
        }
        // A robust rule that tolerates no party at the job's smallest round
        // is a plain mean in disguise: one party would move it anywhere
        // (the default 0.1 trims nothing below 10 parties; found by review).
        if name == "trimmed_mean" {
            let beta = self.trim_fraction.unwrap_or(0.1);
            if beta.is_finite() && (0.0..0.5).contains(&beta) && (beta * min_parties as f64).floor() < 1.0 {
                e.push((
                    "trim_fraction".into(),
                    format!(
                        "trims no party at parties.min = {min_parties} (⌊{beta} × {min_parties}⌋ = 0), so one party \
                         moves the mean anywhere: set it to at least 1/{min_parties} (and below 0.5), or use median"
                    ),
                ));
            }
        }
        if name == "median" && min_parties < 3 {
            e.push((
                "name".into(),
                format!("median needs parties.min >= 3: the median of {min_parties} updates is their mean"),
            ));
        }
        if name == "krum" {
            let f = self.byzantine.unwrap_or(1);
            // Checked arithmetic: a huge count wrapped to a small bound and
            // passed (found by review).
            match f.checked_mul(2).and_then(|d| d.checked_add(3)) {
                Some(needed) if min_parties >= needed => {}
                Some(needed) => e.push((
                    "byzantine".into(),
                    format!("krum with {f} byzantine parties needs parties.min >= {needed}"),
                )),
                None => {
                    e.push(("byzantine".into(), format!("{f} byzantine parties is more than any federation holds")))
                }
            }
        }
        e
    }

    /// The typed strategy; only called after [`RawStrategy::validate`] passed.
    fn typed(&self) -> StrategyConfig {
        let adaptive = || AdaptiveSettings {
            server_learning_rate: self.server_learning_rate.unwrap_or(0.1),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.99),
            tau: self.tau.unwrap_or(1e-3),
        };
        match self.name.as_deref().unwrap_or("fedavg") {
            "fedprox" => StrategyConfig::FedProx { proximal_mu: self.proximal_mu.unwrap_or(0.01) },
            "fedavgm" => StrategyConfig::FedAvgM {
                server_learning_rate: self.server_learning_rate.unwrap_or(1.0),
                momentum: self.momentum.unwrap_or(0.9),
            },
            "fedadagrad" => StrategyConfig::FedAdagrad(adaptive()),
            "fedyogi" => StrategyConfig::FedYogi(adaptive()),
            "fedadam" => StrategyConfig::FedAdam(adaptive()),
            "median" => StrategyConfig::Median,
            "trimmed_mean" => StrategyConfig::TrimmedMean { trim_fraction: self.trim_fraction.unwrap_or(0.1) },
            "krum" => StrategyConfig::Krum { byzantine: self.byzantine.unwrap_or(1) },
            "custom" => {
                StrategyConfig::Custom { name: self.custom.clone().unwrap_or_default(), options: self.options.clone() }
            }
            _ => StrategyConfig::FedAvg,
        }
    }
}

impl From<&StrategyConfig> for RawStrategy {
    fn from(s: &StrategyConfig) -> Self {
        let mut r = RawStrategy { name: Some(s.name().to_owned()), ..RawStrategy::default() };
        let mut adaptive = |a: &AdaptiveSettings| {
            r.server_learning_rate = Some(a.server_learning_rate);
            r.beta1 = Some(a.beta1);
            r.beta2 = Some(a.beta2);
            r.tau = Some(a.tau);
        };
        match s {
            StrategyConfig::FedAdagrad(a) | StrategyConfig::FedYogi(a) | StrategyConfig::FedAdam(a) => adaptive(a),
            StrategyConfig::FedProx { proximal_mu } => r.proximal_mu = Some(*proximal_mu),
            StrategyConfig::FedAvgM { server_learning_rate, momentum } => {
                r.server_learning_rate = Some(*server_learning_rate);
                r.momentum = Some(*momentum);
            }
            StrategyConfig::TrimmedMean { trim_fraction } => r.trim_fraction = Some(*trim_fraction),
            StrategyConfig::Krum { byzantine } => r.byzantine = Some(*byzantine),
            StrategyConfig::Custom { name, options } => {
                r.custom = Some(name.clone());
                r.options = options.clone();
            }
            StrategyConfig::FedAvg | StrategyConfig::Median => {}
        }
        r
    }
}

/// How the parties' updates are combined: an aggregation protocol by name
/// and its settings (the spec's `[aggregation.NAME]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct AggregationSpec {
    /// The protocol (`none`, `secagg`, `he`, ...).
    pub protocol: String,
    /// Its settings table as written (the protocol fills in defaults).
    pub settings: toml::Table,
}

impl Default for AggregationSpec {
    fn default() -> Self {
        AggregationSpec { protocol: "none".into(), settings: toml::Table::new() }
    }
}

/// The `[aggregation]` table as written: `protocol` and one sub-table per protocol.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RawAggregation {
    /// The protocol (default `none`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `[aggregation.NAME]` settings tables.
    #[serde(flatten)]
    pub tables: BTreeMap<String, toml::Value>,
}

/// The deprecated `[privacy]` table (mode and SecAgg+ settings side by side).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyPrivacy {
    /// The protocol.
    #[serde(default)]
    pub mode: Option<String>,
    /// secagg: threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// secagg: bits.
    #[serde(default)]
    pub bits: Option<u32>,
    /// secagg: clip.
    #[serde(default)]
    pub clip: Option<f32>,
    /// secagg: max_examples.
    #[serde(default)]
    pub max_examples: Option<u64>,
}

/// Evaluation cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Evaluate after every `every` rounds (and always after the last).
    #[serde(default = "one")]
    pub every: u32,
}

fn one() -> u32 {
    1
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec { every: 1 }
    }
}

/// Deadlines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// How long to wait for parties to accept before starting (or failing).
    #[serde(default = "default_recruit")]
    pub recruit_secs: u64,
    /// How long a stage waits for answers; late parties are dropped from the round.
    #[serde(default = "default_round")]
    pub round_secs: u64,
    /// Once `parties.min` parties have answered a stage that needs a head
    /// count, how much longer it waits for the rest (none: until
    /// `round_secs`). Bounds what a party that answers just before each
    /// deadline can cost a round; stages whose protocol counts its own
    /// quorum (a reconstruction threshold) wait as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub straggler_secs: Option<u64>,
}

fn default_recruit() -> u64 {
    60
}
fn default_round() -> u64 {
    300
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { recruit_secs: default_recruit(), round_secs: default_round(), straggler_secs: None }
    }
}

/// The spec as written in TOML. [`JobSpec::parse`] validates it as a whole
/// before building the typed [`JobSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJobSpec {
    /// Human-readable name.
    pub name: String,
    /// `train`, `evaluate`, or a registered kind.
    pub kind: String,
    /// Training rounds (1 for `evaluate`).
    #[serde(default = "one")]
    pub rounds: u32,
    /// Start from (`train`) or evaluate (`evaluate`) this earlier job's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_job: Option<String>,
    /// Who takes part.
    pub parties: PartiesSpec,
    /// How updates are combined.
    #[serde(default)]
    pub strategy: RawStrategy,
    /// The model.
    pub model: RawModel,
    /// Local training settings.
    #[serde(default)]
    pub training: TrainConfig,
    /// Evaluation cadence.
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// The aggregation protocol and its settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<RawAggregation>,
    /// Deprecated: `[privacy] mode` and SecAgg+ settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<LegacyPrivacy>,
    /// Differential privacy (see [`crate::dpspec`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp: Option<RawDp>,
    /// Settings of an extension job kind.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub extension: toml::Table,
    /// An incremental pipeline's settings (`kind = "incremental"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incremental: Option<IncrementalSpec>,
    /// The pipeline that started this train or evaluate job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineRef>,
    /// Deadlines.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Human-readable name.
    pub name: String,
    /// What the job does.
    pub kind: JobKind,
    /// Training rounds (1 for `evaluate`).
    pub rounds: u32,
    /// Start from (`train`) or evaluate (`evaluate`) this earlier job's model.
    pub from_job: Option<String>,
    /// Who takes part.
    pub parties: PartiesSpec,
    /// How updates are combined into the next model.
    pub strategy: StrategyConfig,
    /// The model.
    pub model: ModelConfig,
    /// Local training settings.
    pub training: TrainConfig,
    /// Evaluation cadence.
    pub evaluation: EvaluationSpec,
    /// How the parties' updates reach the coordinator.
    pub aggregation: AggregationSpec,
    /// Differential privacy, when the job has it.
    pub dp: Option<DpSpec>,
    /// Settings of an extension job kind (its `[extension]` table).
    pub extension: toml::Table,
    /// An incremental pipeline's settings (`kind = "incremental"`).
    pub incremental: Option<IncrementalSpec>,
    /// The pipeline that started this train or evaluate job.
    pub pipeline: Option<PipelineRef>,
    /// Deadlines.
    pub timeouts: Timeouts,
    /// Deprecations found while parsing (not part of the spec's meaning).
    pub warnings: Vec<String>,
}

/// Every problem found in a spec, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors {
    /// The file (or source name) the spec came from.
    pub file: String,
    /// `(field path, message)` pairs.
    pub errors: Vec<(String, String)>,
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: invalid job spec ({} error{})",
            self.file,
            self.errors.len(),
            if self.errors.len() == 1 { "" } else { "s" }
        )?;
        for (path, msg) in &self.errors {
            write!(f, "\n  {}: {path}: {msg}", self.file)?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

impl JobSpec {
    /// Parses and validates a spec against the built-in aggregation
    /// protocols. `file` names the source in errors.
    pub fn parse(text: &str, file: &str, limits: &Limits) -> Result<JobSpec, SpecErrors> {
        Self::parse_with(text, file, limits, Protocols::builtin())
    }

    /// The `[model]` of a stored spec, checked on its own: a job accepted by
    /// an earlier build keeps its model's description (for its deployments
    /// and the model list) when a later build refuses another of its
    /// settings.
    pub fn stored_model(text: &str, file: &str, limits: &Limits) -> Result<ModelConfig, SpecErrors> {
        let fail = |path: &str, msg: String| SpecErrors { file: file.to_owned(), errors: vec![(path.to_owned(), msg)] };
        if text.len() > limits.max_spec_bytes {
            return Err(fail("(file)", format!("{} bytes; the limit is {}", text.len(), limits.max_spec_bytes)));
        }
        /// The model alone: other tables (a `[dp]` field a later build
        /// renamed) are not read.
        #[derive(Deserialize)]
        struct ModelOnly {
            model: RawModel,
        }
        let raw: ModelOnly = toml::from_str(text).map_err(|e| fail("(syntax)", one_line(&e.to_string())))?;
        let errors: Vec<(String, String)> = raw.model.validate().iter().map(|m| in_table("model", m)).collect();
        if !errors.is_empty() {
            return Err(SpecErrors { file: file.to_owned(), errors });
        }
        ModelConfig::try_from(raw.model).map_err(|m| fail("model", m))
    }

    /// [`JobSpec::parse`] for a build that registers further protocols.
    pub fn parse_with(text: &str, file: &str, limits: &Limits, protocols: &Protocols) -> Result<JobSpec, SpecErrors> {
        Self::parse_raw(text, file, limits)?
            .into_spec(limits, protocols)
            .map_err(|errors| SpecErrors { file: file.to_owned(), errors })
    }

    /// [`JobSpec::parse_with`] for a spec a coordinator offers a party.
    /// The coordinator offers the spec it resolved (`to_toml`), whose `[dp]`
    /// table always carries `noise_multiplier`; a table with
    /// `target_epsilon` alone would make the party calibrate the noise
    /// itself, a search the coordinator could make long (the PLD
    /// accountant's grids) on the party's one acceptance slot. Refused,
    /// naming the field, before anything is calibrated.
    pub fn parse_offer(text: &str, file: &str, limits: &Limits, protocols: &Protocols) -> Result<JobSpec, SpecErrors> {
        let raw = Self::parse_raw(text, file, limits)?;
        if raw.dp.as_ref().is_some_and(|dp| dp.noise_multiplier.is_none()) {
            return Err(SpecErrors {
                file: file.to_owned(),
                errors: vec![(
                    "dp.noise_multiplier".into(),
                    "missing: an offered [dp] table carries the noise multiplier the coordinator resolved; a \
                     party does not calibrate an offered target_epsilon"
                        .into(),
                )],
            });
        }
        raw.into_spec(limits, protocols).map_err(|errors| SpecErrors { file: file.to_owned(), errors })
    }

    /// The text within the size limit, deserialised: nothing validated.
    fn parse_raw(text: &str, file: &str, limits: &Limits) -> Result<RawJobSpec, SpecErrors> {
        let fail = |path: &str, msg: String| SpecErrors { file: file.to_owned(), errors: vec![(path.to_owned(), msg)] };
        if text.len() > limits.max_spec_bytes {
            return Err(fail("(file)", format!("{} bytes; the limit is {}", text.len(), limits.max_spec_bytes)));
        }
        let de = toml::Deserializer::parse(text).map_err(|e| fail("(syntax)", one_line(&e.to_string())))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            fail(if path == "." { "(top level)" } else { &path }, one_line(&e.into_inner().to_string()))
        })
    }

    /// The minimum number of parties, resolved.
    pub fn min_parties(&self) -> usize {
        min_parties(&self.parties)
    }

    /// The data set `party` should use.
    pub fn dataset_for(&self, party: &str) -> &str {
        self.parties.datasets.get(party).map(String::as_str).unwrap_or(&self.parties.dataset)
    }

    /// What the aggregation protocol of job `job_id` may know of it.
    pub fn facts(&self, job_id: &str, limits: &Limits) -> JobFacts {
        JobFacts {
            distributed_dp: self.dp.as_ref().and_then(|d| d.ddg_config(d.model_values_bound())),
            adaptive_clip: self.dp.as_ref().and_then(|d| d.adaptive),
            ..JobFacts::new(
                job_id,
                self.parties.names.clone(),
                limits.max_parties,
                self.min_parties(),
                limits.max_values,
            )
        }
    }

    /// The spec as TOML tables (what parties receive, what the database keeps).
    pub fn to_raw(&self) -> RawJobSpec {
        let mut tables = BTreeMap::new();
        if !self.aggregation.settings.is_empty() {
            tables.insert(self.aggregation.protocol.clone(), toml::Value::Table(self.aggregation.settings.clone()));
        }
        RawJobSpec {
            name: self.name.clone(),
            kind: self.kind.as_str().to_owned(),
            rounds: self.rounds,
            from_job: self.from_job.clone(),
            parties: self.parties.clone(),
            strategy: RawStrategy::from(&self.strategy),
            model: RawModel::from(self.model.clone()),
            training: self.training.clone(),
            evaluation: self.evaluation.clone(),
            aggregation: Some(RawAggregation { protocol: Some(self.aggregation.protocol.clone()), tables }),
            privacy: None,
            dp: self.dp.as_ref().map(DpSpec::to_raw),
            extension: self.extension.clone(),
            incremental: self.incremental.clone(),
            pipeline: self.pipeline.clone(),
            timeouts: self.timeouts.clone(),
        }
    }

    /// Serialises back to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_raw()).unwrap_or_default()
    }
}

fn min_parties(p: &PartiesSpec) -> usize {
    p.min.unwrap_or(p.names.len().max(1))
}

impl RawJobSpec {
    /// Every `(path, message)` problem, or the typed spec.
    pub fn into_spec(self, limits: &Limits, protocols: &Protocols) -> Result<JobSpec, Vec<(String, String)>> {
        let mut e: Vec<(String, String)> = Vec::new();
        let mut warnings = Vec::new();
        let mut err = |p: &str, m: String| e.push((p.to_owned(), m));
        if self.name.is_empty()
            || self.name.len() > 100
            || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || " -_.".contains(c))
        {
            err("name", "1 to 100 letters, digits, spaces, '-', '_' or '.'".into());
        }
        if !(1..=10_000).contains(&self.rounds) {
            err("rounds", format!("must be 1..=10000 (got {})", self.rounds));
        }
        let kind = JobKind::parse(&self.kind);
        if let JobKind::Extension(k) = &kind
            && (k.is_empty()
                || k.len() > 64
                || !k.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_".contains(c)))
        {
            err("kind", format!("{k:?} is not a job kind (train, evaluate, or a registered kind's name)"));
        }
        match (&kind, &self.from_job) {
            (JobKind::Evaluate, None) => {
                err("from_job", "an evaluate job needs the id of the job whose model it evaluates".into())
            }
            (JobKind::Evaluate, Some(_)) if self.rounds != 1 => {
                err("rounds", "an evaluate job has exactly 1 round".into())
            }
            _ => {}
        }
        if let Some(j) = &self.from_job
            && (j.is_empty() || j.len() > 64 || !j.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            err("from_job", format!("{j:?} is not a job id"));
        }
        let names = &self.parties.names;
        if names.len() > limits.max_parties {
            err("parties.names", format!("{} parties; the limit is {}", names.len(), limits.max_parties));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in names.iter().enumerate() {
            if let Err(x) = party_name_check(n) {
                err(&format!("parties.names[{i}]"), x);
            }
            if !seen.insert(n) {
                err(&format!("parties.names[{i}]"), format!("{n:?} is listed twice"));
            }
        }
        match self.parties.min {
            Some(0) => err("parties.min", "must be at least 1".into()),
            Some(m) if !names.is_empty() && m > names.len() => {
                err("parties.min", format!("{m} exceeds the {} named parties", names.len()))
            }
            Some(m) if m > limits.max_parties => {
                err("parties.min", format!("{m} exceeds the limit of {}", limits.max_parties))
            }
            None if names.is_empty() => err("parties", "give `names`, `min`, or both".into()),
            _ => {}
        }
        if self.parties.dataset.is_empty() || self.parties.dataset.len() > 128 {
            err("parties.dataset", "must be a data set name of 1 to 128 bytes".into());
        }
        for (party, ds) in &self.parties.datasets {
            if !names.is_empty() && !names.contains(party) {
                err(&format!("parties.datasets.{party}"), "not one of parties.names".into());
            }
            if ds.is_empty() || ds.len() > 128 {
                err(&format!("parties.datasets.{party}"), "must be a data set name of 1 to 128 bytes".into());
            }
        }
        for (field, msg) in self.model.validate().iter().map(|m| in_table("model", m)) {
            err(&field, msg);
        }
        // A model larger than the limit would be allocated by every party
        // before anything else refused it (a party's acceptance builds it).
        if let Some(values) = self.model.values_at_least()
            && values > limits.max_values as u64
        {
            err(
                "model",
                format!(
                    "the architecture has at least {values} values; the limit is {} (limits.max_values)",
                    limits.max_values
                ),
            );
        }
        let engine = match (self.model.kind, self.model.engine) {
            (confide_algorithms::ModelKind::LogisticRegression, None) => Engine::Rust,
            (confide_algorithms::ModelKind::Custom, _) => Engine::Rust,
            (_, Some(e)) => e,
            (_, None) => Engine::Torch,
        };
        if engine == Engine::Rust && self.training.optimizer != OptimizerKind::Sgd {
            err("training.optimizer", "the rust engine trains with SGD; set model.engine = \"torch\"".into());
        }
        for (field, msg) in self.training.validate().iter().map(|m| in_table("training", m)) {
            err(&field, msg);
        }
        if self.evaluation.every == 0 {
            err("evaluation.every", "must be at least 1".into());
        }
        let min = min_parties(&self.parties);
        let strategy_errors = self.strategy.validate(min);
        let strategy_ok = strategy_errors.is_empty();
        for (field, msg) in strategy_errors {
            err(&format!("strategy.{field}"), msg);
        }

        // The aggregation protocol: [aggregation], or the deprecated [privacy].
        let (aggregation, origin) = match (&self.aggregation, &self.privacy) {
            (Some(_), Some(_)) => {
                err("privacy", "[privacy] is deprecated and cannot be combined with [aggregation]; remove it".into());
                (AggregationSpec::default(), "aggregation")
            }
            (None, Some(legacy)) => {
                let protocol = legacy.mode.clone().unwrap_or_else(|| "none".into());
                let mut settings = toml::Table::new();
                if let Some(v) = legacy.threshold {
                    settings.insert("threshold".into(), toml::Value::Float(v));
                }
                if let Some(v) = legacy.bits {
                    settings.insert("bits".into(), toml::Value::Integer(i64::from(v)));
                }
                if let Some(v) = legacy.clip {
                    settings.insert("clip".into(), toml::Value::Float(f64::from(v)));
                }
                if let Some(v) = legacy.max_examples {
                    settings.insert("max_examples".into(), toml::Value::Integer(v.min(i64::MAX as u64) as i64));
                }
                warnings.push(format!(
                    "[privacy] is deprecated: write [aggregation] protocol = {protocol:?}{}",
                    if settings.is_empty() {
                        String::new()
                    } else {
                        format!(" and its settings in [aggregation.{protocol}]")
                    }
                ));
                (AggregationSpec { protocol, settings }, "privacy")
            }
            (Some(a), None) => {
                let protocol = a.protocol.clone().unwrap_or_else(|| "none".into());
                let mut settings = toml::Table::new();
                for (key, value) in &a.tables {
                    match (value, protocols.get(key)) {
                        (toml::Value::Table(t), Some(_)) if *key == protocol => settings = t.clone(),
                        (toml::Value::Table(_), Some(_)) => err(
                            &format!("aggregation.{key}"),
                            format!("only applies to protocol {key:?} (protocol is {protocol:?})"),
                        ),
                        (toml::Value::Table(_), None) => err(
                            &format!("aggregation.{key}"),
                            format!("no aggregation protocol named {key:?} (known: {})", protocols.names().join(", ")),
                        ),
                        _ => err(
                            &format!("aggregation.{key}"),
                            "unknown field (protocol, or a protocol's settings table)".into(),
                        ),
                    }
                }
                (AggregationSpec { protocol, settings }, "aggregation")
            }
            (None, None) => (AggregationSpec::default(), "aggregation"),
        };
        let (protocol_field, settings_path) = if origin == "privacy" {
            ("privacy.mode".to_string(), "privacy".to_string())
        } else {
            ("aggregation.protocol".to_string(), format!("aggregation.{}", aggregation.protocol))
        };
        let facts = JobFacts::new("", names.clone(), limits.max_parties, min, limits.max_values);
        match protocols.get(&aggregation.protocol) {
            None => err(
                &protocol_field,
                format!(
                    "no aggregation protocol named {:?} (known: {})",
                    aggregation.protocol,
                    protocols.names().join(", ")
                ),
            ),
            Some(p) => {
                for problem in p.validate(&aggregation.settings, &facts) {
                    let path = match (problem.absolute, problem.field.is_empty()) {
                        (true, _) => problem.field,
                        (false, true) => settings_path.clone(),
                        (false, false) => format!("{settings_path}.{}", problem.field),
                    };
                    err(&path, problem.message);
                }
                if strategy_ok
                    && p.reveals() == Reveals::WeightedSum
                    && self.strategy.typed().capabilities().is_some_and(|c| !c.weighted_sum)
                {
                    err(
                        "strategy.name",
                        format!(
                            "{:?} needs individual updates; aggregation protocol {:?} reveals only their sum",
                            self.strategy.typed().name(),
                            aggregation.protocol
                        ),
                    );
                }
            }
        }
        let mut dp = None;
        if let Some(raw) = self.dp.as_ref().filter(|_| kind == JobKind::Evaluate) {
            // An evaluation releases noisy counts: no gradients, so any
            // built-in model kind (TorchScript included) and no feature
            // ranges. Not a plug-in's: the counts' sensitivity rests on each
            // row adding at most one to each, which a plug-in's `evaluate`
            // (its accuracy, its example count) does not promise.
            if self.model.kind == confide_algorithms::ModelKind::Custom {
                err(
                    "model.kind",
                    "a DP evaluation releases noisy counts of rows scored and rows right, each row adding at most \
                     one; a custom model's evaluate promises no such count, so it cannot be evaluated with [dp]"
                        .to_string(),
                );
            }
            match raw.validate_evaluation() {
                Ok(d) => dp = Some(d),
                Err(problems) => {
                    for (field, msg) in problems {
                        err(&format!("dp.{field}"), msg);
                    }
                }
            }
        } else if let Some(raw) = &self.dp {
            if kind != JobKind::Train && kind != JobKind::Incremental {
                err("dp", format!("applies to train jobs (kind is {:?})", kind.as_str()));
            }
            // A TorchScript module is checked by each party, against its own
            // file (one built from the built-in models' layers trains with
            // DP-SGD).
            if self.model.kind == confide_algorithms::ModelKind::Custom {
                err(
                    "model.kind",
                    format!(
                        "DP-SGD needs per-example gradients, which Confide computes for logistic_regression, mlp, \
                         cnn and TorchScript modules built from their layers; a {} model cannot train with [dp]",
                        self.model.kind.as_str()
                    ),
                );
            }
            match (self.model.standardize, &raw.feature_ranges) {
                (true, None) => err(
                    "dp.feature_ranges",
                    "model.standardize needs each feature's public [low, high] range under [dp]: feature \
                     statistics of the rows would cost privacy (or set model.standardize = false)"
                        .into(),
                ),
                (false, Some(_)) => err("dp.feature_ranges", "only applies when model.standardize = true".into()),
                _ => {}
            }
            // Party level under a protocol that sums: distributed noise,
            // calibrated for the fewest honest parties any revealed sum holds.
            let mut distributed = None;
            if raw.level.as_deref() == Some("party") && aggregation.protocol != "none" {
                match protocols.get(&aggregation.protocol).and_then(|p| p.noise_carrier(&aggregation.settings, &facts))
                {
                    None => err(
                        "dp.level",
                        format!(
                            "party-level DP needs aggregation.protocol = \"none\" (central noise, added by the \
                             coordinator) or a protocol that sums and carries distributed noise (\"secagg\"); \
                             {:?} does not",
                            aggregation.protocol
                        ),
                    ),
                    Some(_) if names.is_empty() => err(
                        "parties.names",
                        "distributed DP calibrates each party's noise for the parties of the job: name them".into(),
                    ),
                    Some(carrier) if names.len() > carrier.max_parties => err(
                        "parties.names",
                        format!(
                            "distributed DP under {:?} is for up to {} parties: larger rounds use sparse graphs, where \
                             secure aggregation proves only that an unmasked input is summed with one other honest \
                             input, not the parties.min less corrupt ones the noise is calibrated for ({} named)",
                            aggregation.protocol,
                            carrier.max_parties,
                            names.len()
                        ),
                    ),
                    Some(carrier) => {
                        let honest = min.saturating_sub(carrier.corrupt_parties);
                        if honest == 0 {
                            err(
                                "parties.min",
                                format!(
                                    "{min} parties, of which the protocol's threat model lets {} be corrupt, leave \
                                     no honest party's noise in the sum; raise parties.min",
                                    carrier.corrupt_parties
                                ),
                            );
                        } else {
                            distributed = Some(crate::dpspec::DistributedNoise {
                                bits: carrier.bits,
                                max_parties: names.len(),
                                honest_parties: honest,
                            });
                        }
                    }
                }
            }
            match raw.validate(&self.training, self.rounds, distributed) {
                Ok(d) => {
                    if let Some(t) = d.answer_fit_after_secs
                        && !crate::dpspec::answer_floor_fits(t, self.timeouts.round_secs)
                    {
                        err(
                            "dp.answer_fit_after_secs",
                            format!(
                                "{t} s would make every answer miss the round's deadline (timeouts.round_secs = {}; \
                                 the floor must leave {} s for the answer to arrive)",
                                self.timeouts.round_secs,
                                crate::dpspec::FIT_ANSWER_MARGIN_SECS
                            ),
                        );
                    }
                    if d.level == crate::dpspec::DpLevel::Party
                        && strategy_ok
                        && self.strategy.typed().capabilities().is_some_and(|c| !c.weighted_sum)
                    {
                        err(
                            "strategy.name",
                            format!(
                                "{:?} needs individual updates; party-level DP releases only their noisy sum",
                                self.strategy.typed().name()
                            ),
                        );
                    }
                    dp = Some(d)
                }
                Err(problems) => {
                    for (field, msg) in problems {
                        err(&format!("dp.{field}"), msg);
                    }
                }
            }
        }
        match (&kind, &self.incremental) {
            (JobKind::Incremental, None) => {
                err("incremental", "an incremental job needs its [incremental] table".into())
            }
            (JobKind::Incremental, Some(i)) => {
                for (f, m) in i.validate() {
                    err(&f, m);
                }
                if self.from_job.is_some() {
                    err("from_job", "an incremental pipeline starts from its service's deployed version".into());
                }
            }
            (_, Some(_)) => {
                err("incremental", format!("only applies to incremental jobs (kind is {:?})", kind.as_str()))
            }
            (_, None) => {}
        }
        if let Some(p) = &self.pipeline {
            if !matches!(kind, JobKind::Train | JobKind::Evaluate) {
                err("pipeline", format!("marks a pipeline's train and evaluate jobs (kind is {:?})", kind.as_str()));
            }
            for (f, m) in p.validate() {
                err(&f, m);
            }
            // A DP evaluation in a pipeline is not built: over its new rows,
            // whether any exists is a fact of the rows the release would show.
            if kind == JobKind::Evaluate && self.dp.is_some() {
                err("dp", "a pipeline's evaluate jobs have no differential privacy yet (not built)".into());
            }
        }
        if !matches!(kind, JobKind::Extension(_)) && !self.extension.is_empty() {
            err("extension", format!("only applies to extension job kinds (kind is {:?})", kind.as_str()));
        }
        if !(1..=86_400).contains(&self.timeouts.recruit_secs) {
            err("timeouts.recruit_secs", format!("must be 1..=86400 (got {})", self.timeouts.recruit_secs));
        }
        if !(1..=86_400).contains(&self.timeouts.round_secs) {
            err("timeouts.round_secs", format!("must be 1..=86400 (got {})", self.timeouts.round_secs));
        }
        if let Some(s) = self.timeouts.straggler_secs
            && !(1..self.timeouts.round_secs).contains(&s)
        {
            err(
                "timeouts.straggler_secs",
                format!(
                    "must be at least 1 and below timeouts.round_secs ({}), or it never applies (got {s})",
                    self.timeouts.round_secs
                ),
            );
        }
        if !e.is_empty() {
            return Err(e);
        }
        let strategy = self.strategy.typed();
        let model = ModelConfig::try_from(self.model).map_err(|m| vec![("model".to_owned(), m)])?;
        Ok(JobSpec {
            name: self.name,
            kind,
            rounds: self.rounds,
            from_job: self.from_job,
            parties: self.parties,
            strategy,
            model,
            training: self.training,
            evaluation: self.evaluation,
            aggregation,
            dp,
            extension: self.extension,
            incremental: self.incremental,
            pipeline: self.pipeline,
            timeouts: self.timeouts,
            warnings,
        })
    }
}

/// Same rule as `confide_crypto::pki::validate_party_name`.
fn party_name_check(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
        && n.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok { Ok(()) } else { Err(format!("{n:?} is not a valid party name")) }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "bc"
kind = "train"
rounds = 3
[parties]
names = ["hospital-a", "hospital-b"]
min = 1
dataset = "breast-cancer"
[model]
kind = "logistic_regression"
classes = 2
"#;

    #[test]
    fn parses_a_good_spec_with_defaults() {
        let s = JobSpec::parse(GOOD, "good.toml", &Limits::default()).unwrap();
        assert_eq!(s.min_parties(), 1);
        assert_eq!(s.training.batch_size, 32);
        assert_eq!(s.aggregation.protocol, "none");
        assert_eq!(s.dataset_for("hospital-a"), "breast-cancer");
        let again = JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap();
        assert_eq!(again, s);
    }

    /// A model larger than the limit on values is refused from the spec
    /// alone, before any party builds (allocates) it: sixteen hidden layers
    /// of 65,536 units, or a CNN of 1,024 channels on a large image; the
    /// demo's sizes pass. The bound is exact for a CNN and counts an MLP's
    /// input layer at one feature.
    #[test]
    fn a_model_over_the_limit_on_values_is_refused_from_the_spec() {
        let with = |model: &str| GOOD.replace("kind = \"logistic_regression\"\nclasses = 2", model);
        let limits = Limits::default();
        for model in [
            format!("kind = \"mlp\"\nclasses = 2\nhidden = [{}]", ["65536"; 16].join(", ")),
            "kind = \"cnn\"\nclasses = 10\nimage = [64, 1024, 1024]\nchannels = [1024, 1024]".to_owned(),
        ] {
            let e = JobSpec::parse(&with(&model), "big.toml", &limits).unwrap_err().to_string();
            assert!(e.contains("model: the architecture has at least") && e.contains("limits.max_values"), "{e}");
        }
        for model in [
            "kind = \"mlp\"\nclasses = 2\nhidden = [64, 32]",
            "kind = \"cnn\"\nclasses = 10\nimage = [1, 8, 8]\nchannels = [16, 32]",
        ] {
            JobSpec::parse(&with(model), "ok.toml", &limits).unwrap();
        }
        // Exactly at the limit passes, one value more does not: an MLP with
        // one hidden unit has 1·h + h + h·2 + 2 values at width 1.
        let tight = Limits { max_values: 1 + 1 + 2 + 2, ..limits };
        JobSpec::parse(&with("kind = \"mlp\"\nclasses = 2\nhidden = [1]"), "t.toml", &tight).unwrap();
        let tighter = Limits { max_values: 5, ..limits };
        assert!(JobSpec::parse(&with("kind = \"mlp\"\nclasses = 2\nhidden = [1]"), "t.toml", &tighter).is_err());
    }

    #[test]
    fn reports_every_semantic_error_with_paths() {
        let bad = GOOD
            .replace("rounds = 3", "rounds = 0")
            .replace("min = 1", "min = 5")
            .replace("classes = 2", "classes = 1")
            .replace("[model]", "[training]\nbatch_size = 0\n[model]");
        let e = JobSpec::parse(&bad, "jobs/bad.toml", &Limits::default()).unwrap_err();
        let paths: Vec<&str> = e.errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, vec!["rounds", "parties.min", "model.classes", "training.batch_size"]);
        assert!(e.to_string().contains("jobs/bad.toml: rounds: must be"));
    }

    #[test]
    fn reports_type_unknown_and_syntax_errors_with_paths() {
        let e = JobSpec::parse(&GOOD.replace("min = 1", "min = \"x\""), "f.toml", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "parties.min");
        let e = JobSpec::parse(&format!("{GOOD}colour = 3\n"), "f.toml", &Limits::default()).unwrap_err();
        assert!(e.errors[0].1.contains("colour"), "{e}");
        let e = JobSpec::parse(&GOOD.replace("\"logistic_regression\"", "\"resnet\""), "f", &Limits::default())
            .unwrap_err();
        assert_eq!(e.errors[0].0, "model.kind");
        let e = JobSpec::parse("name = ", "f.toml", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "(syntax)");
        let e = JobSpec::parse(&GOOD.replace("\"hospital-b\"", "\"Bad Name\""), "f", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "parties.names[1]");
        let big = "#".repeat(Limits::default().max_spec_bytes + 1);
        assert!(JobSpec::parse(&big, "f", &Limits::default()).is_err());
    }
}

#[cfg(test)]
mod strategy_tests {
    use super::*;

    const BASE: &str = "name = \"s\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n\
                        [model]\nkind = \"logistic_regression\"\nclasses = 2\n";

    #[test]
    fn robust_rules_are_refused_with_secure_aggregation() {
        let spec = format!("{BASE}[strategy]\nname = \"median\"\n[aggregation]\nprotocol = \"secagg\"\n");
        let e = JobSpec::parse(&spec, "f", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "strategy.name");
        assert!(e.errors[0].1.contains("reveals only their sum"));
        let ok = format!("{BASE}[strategy]\nname = \"fedadam\"\ntau = 0.01\n[aggregation]\nprotocol = \"secagg\"\n");
        JobSpec::parse(&ok, "f", &Limits::default()).unwrap();
        let bad = format!("{BASE}[strategy]\nname = \"krum\"\nbeta1 = 1.5\n");
        let e = JobSpec::parse(&bad, "f", &Limits::default()).unwrap_err();
        let paths: Vec<&str> = e.errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, vec!["strategy.beta1", "strategy.byzantine"]);
        // A count whose bound overflows is refused, not wrapped to a small one.
        let huge = format!("{BASE}[strategy]\nname = \"krum\"\nbyzantine = 9223372036854775807\n");
        let e = JobSpec::parse(&huge, "f", &Limits::default()).unwrap_err();
        assert_eq!(e.errors.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(), ["strategy.byzantine"]);
    }

    /// A robust rule that trims or outvotes no party at the job's smallest
    /// round is refused: trimmed_mean's default 0.1 trimmed nothing below
    /// ten parties, so one party sending 3e38 decided the mean (found by
    /// review); the median of two is their mean.
    #[test]
    fn robust_rules_that_tolerate_no_party_are_refused() {
        let with = |strategy: &str, min: usize| {
            let spec = BASE.replace("dataset = \"d\"", &format!("min = {min}\ndataset = \"d\""));
            let spec = spec.replace("names = [\"a\", \"b\", \"c\"]", "names = [\"a\", \"b\", \"c\", \"d\", \"e\"]");
            JobSpec::parse(&format!("{spec}[strategy]\n{strategy}"), "f", &Limits::default())
        };
        let e = with("name = \"trimmed_mean\"", 3).unwrap_err();
        assert_eq!(e.errors[0].0, "strategy.trim_fraction");
        assert!(e.errors[0].1.contains("trims no party at parties.min = 3"), "{e}");
        with("name = \"trimmed_mean\"\ntrim_fraction = 0.34", 3).unwrap();
        assert!(with("name = \"trimmed_mean\"\ntrim_fraction = 0.2", 4).is_err());
        with("name = \"trimmed_mean\"\ntrim_fraction = 0.2", 5).unwrap();
        let e = with("name = \"median\"", 2).unwrap_err();
        assert!(e.errors[0].0 == "strategy.name" && e.errors[0].1.contains("their mean"), "{e}");
        with("name = \"median\"", 3).unwrap();
    }
}

#[cfg(test)]
mod aggregation_tests {
    use super::*;
    use confide_crypto::aggregation::secagg::SecAggSettings;

    const BASE: &str = "name = \"s\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n\
                        [model]\nkind = \"logistic_regression\"\nclasses = 2\n";

    fn paths(text: &str) -> Vec<String> {
        match JobSpec::parse(text, "f", &Limits::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.into_iter().map(|(p, _)| p).collect(),
        }
    }

    /// Protocol `none` takes `max_examples` in `[aggregation.none]`,
    /// checked at its path; other fields are refused there.
    #[test]
    fn protocol_none_takes_max_examples_at_its_path() {
        let with = |t: &str| format!("{BASE}[aggregation]\nprotocol = \"none\"\n[aggregation.none]\n{t}\n");
        let spec = JobSpec::parse(&with("max_examples = 5000"), "f", &Limits::default()).unwrap();
        assert_eq!(confide_crypto::aggregation::plain::max_examples(&spec.aggregation.settings), 5000);
        assert_eq!(paths(&with("max_examples = 0")), ["aggregation.none.max_examples"]);
        assert_eq!(paths(&with("bits = 16")), ["aggregation.none.bits"]);
        let plain = JobSpec::parse(BASE, "f", &Limits::default()).unwrap();
        assert_eq!(confide_crypto::aggregation::plain::max_examples(&plain.aggregation.settings), 100_000);
    }

    #[test]
    fn secagg_settings_have_safe_defaults_and_are_validated() {
        let s =
            JobSpec::parse(&format!("{BASE}[aggregation]\nprotocol = \"secagg\"\n"), "f", &Limits::default()).unwrap();
        assert_eq!(SecAggSettings::from_table(&s.aggregation.settings).unwrap(), SecAggSettings::default());
        let d = SecAggSettings::default();
        assert_eq!((d.corrupt_fraction, d.dropout_fraction, d.bits, d.max_examples), (0.05, 0.1, 32, 100_000));
        let bad = format!(
            "{BASE}[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nthreshold = 0.4\nbits = 40\nclip = -1.0\n"
        );
        assert_eq!(paths(&bad), ["aggregation.secagg.threshold", "aggregation.secagg.bits", "aggregation.secagg.clip"]);
        let narrow = format!("{BASE}[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nbits = 16\n");
        assert_eq!(paths(&narrow), ["aggregation.secagg.max_examples"]);
        let stray = format!("{BASE}[aggregation]\nprotocol = \"none\"\n[aggregation.secagg]\nbits = 32\n");
        assert_eq!(paths(&stray), ["aggregation.secagg"]);
        let unknown = format!("{BASE}[aggregation]\nprotocol = \"paillier\"\n");
        assert_eq!(paths(&unknown), ["aggregation.protocol"]);
        let typo = format!("{BASE}[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nthreshhold = 0.7\n");
        assert_eq!(paths(&typo), ["aggregation.secagg.threshhold"]);
        let threat = format!(
            "{BASE}[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\ncorrupt_fraction = 0.4\ndropout_fraction = 0.6\n"
        );
        assert_eq!(paths(&threat), ["aggregation.secagg.corrupt_fraction"]);
        let threat =
            format!("{BASE}[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\ndropout_fraction = 0.6\n");
        assert_eq!(paths(&threat), ["aggregation.secagg.dropout_fraction"]);
    }

    #[test]
    fn the_deprecated_privacy_table_still_works_with_a_warning_and_its_own_field_names() {
        let legacy = format!("{BASE}[privacy]\nmode = \"secagg\"\nmax_examples = 1000\n");
        let s = JobSpec::parse(&legacy, "f", &Limits::default()).unwrap();
        assert_eq!(s.aggregation.protocol, "secagg");
        assert_eq!(SecAggSettings::from_table(&s.aggregation.settings).unwrap().max_examples, 1000);
        assert!(s.warnings[0].contains("[privacy] is deprecated") && s.warnings[0].contains("[aggregation.secagg]"));
        // Re-serialised in the new form, without the warning.
        let again = JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap();
        assert!(again.warnings.is_empty() && again.aggregation == s.aggregation);
        let bad = format!("{BASE}[privacy]\nmode = \"secagg\"\nthreshold = 0.4\nbits = 40\nclip = -1.0\n");
        assert_eq!(paths(&bad), ["privacy.threshold", "privacy.bits", "privacy.clip"]);
        assert_eq!(paths(&format!("{BASE}[privacy]\nmode = \"none\"\nbits = 32\n")), ["privacy.bits"]);
        let both = format!("{BASE}[privacy]\nmode = \"secagg\"\n[aggregation]\nprotocol = \"secagg\"\n");
        assert_eq!(paths(&both), ["privacy"]);
    }

    /// A stored spec's model is read on its own: a spec a later build
    /// refuses for another setting keeps its model; a bad model is named.
    #[test]
    fn a_stored_specs_model_is_read_on_its_own() {
        let tightened =
            format!("{BASE}[dp]\nnoise_multiplier = 1.0\nsampling_rate = 0.1\nmax_grad_norm = 1e-9\nrenamed = 1\n");
        assert!(JobSpec::parse(&tightened, "s", &Limits::default()).is_err());
        let model = JobSpec::stored_model(&tightened, "s", &Limits::default()).unwrap();
        assert_eq!(model, JobSpec::parse(BASE, "s", &Limits::default()).unwrap().model);
        let bad = BASE.replace("classes = 2", "classes = 0");
        let e = JobSpec::stored_model(&bad, "s", &Limits::default()).unwrap_err();
        assert!(e.errors.iter().any(|(f, _)| f.starts_with("model")), "{e:?}");
    }

    #[test]
    fn an_evaluate_jobs_dp_table_releases_noisy_counts_once() {
        let evaluate = format!("{BASE}[dp]\ntarget_epsilon = 1.0\n[aggregation]\nprotocol = \"secagg\"\n")
            .replace("kind = \"train\"", "kind = \"evaluate\"\nfrom_job = \"j1\"");
        let s = JobSpec::parse(&evaluate, "e", &Limits::default()).unwrap();
        let dp = s.dp.clone().unwrap();
        assert_eq!(dp.release, crate::dpspec::DpRelease::Evaluation);
        assert_eq!((dp.steps_per_round(&s.training), dp.plan(&s.training, s.rounds)), (1, None));
        let eps = dp.epsilon(&s.training, s.rounds);
        assert!(eps <= 1.0 && eps > 0.99, "{eps}");
        // Not in a pipeline (not built): whether its new rows exist would show.
        let piped = evaluate
            .replace("[dp]", "[pipeline]\njob = \"p1\"\niteration = 1\nservice = \"triage\"\nrows = \"new\"\n[dp]");
        assert_eq!(paths(&piped), ["dp"]);
        // Local epochs or rounds of training settings do not change what it costs.
        let epochs = evaluate.replace("[dp]", "[training]\nlocal_epochs = 5\n[dp]");
        let s5 = JobSpec::parse(&epochs, "e", &Limits::default()).unwrap();
        assert_eq!(s5.dp.as_ref().unwrap().epsilon(&s5.training, s5.rounds), eps);
        assert_eq!(JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap(), s);
        // No gradients: a TorchScript model and standardisation need nothing more.
        let script = evaluate.replace("kind = \"logistic_regression\"", "kind = \"torchscript\"\ntorchscript = \"m\"");
        assert!(JobSpec::parse(&script, "e", &Limits::default()).is_ok());
        // A plug-in's evaluate promises no per-row count.
        let custom = evaluate.replace("kind = \"logistic_regression\"", "kind = \"custom\"\ncustom = \"svm\"");
        assert_eq!(paths(&custom), ["model.kind"]);
        assert!(JobSpec::parse(&custom.replace("[dp]\ntarget_epsilon = 1.0\n", ""), "e", &Limits::default()).is_ok());
        assert_eq!(paths(&evaluate.replace("[dp]", "[dp]\nlevel = \"party\"")), ["dp.level"]);
        assert_eq!(paths(&evaluate.replace("[dp]", "[dp]\nfeature_ranges = [[0.0, 1.0]]")), ["dp.feature_ranges"]);
        assert_eq!(paths(&evaluate.replace("target_epsilon = 1.0", "delta = 1e-5")), ["dp.noise_multiplier"]);
        let over = evaluate.replace("[dp]", "[dp]\nnoise_multiplier = 0.5");
        assert_eq!(paths(&over), ["dp.noise_multiplier"]);
    }

    #[test]
    fn a_dp_table_is_typed_checked_against_the_job_and_round_trips() {
        let ok = format!(
            "{BASE}standardize = false\n[dp]\ntarget_epsilon = 3.0\nsampling_rate = 0.1\n[aggregation]\nprotocol = \"secagg\"\n"
        );
        let s = JobSpec::parse(&ok, "f", &Limits::default()).unwrap();
        let dp = s.dp.clone().unwrap();
        assert!(dp.epsilon(&s.training, s.rounds) <= 3.0);
        assert_eq!(JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap(), s);
        // Standardisation needs public ranges; bad settings are refused,
        // each at its field.
        assert_eq!(paths(&format!("{BASE}[dp]\nnoise_multiplier = 1.0\nsampling_rate = 0.1\n")), ["dp.feature_ranges"]);
        // A TorchScript module is the parties' to check (against their files).
        let script = ok.replace("kind = \"logistic_regression\"", "kind = \"torchscript\"\ntorchscript = \"m\"");
        assert!(JobSpec::parse(&script, "f", &Limits::default()).is_ok());
        // An evaluate job's [dp] releases noisy counts: training's settings
        // are refused there, each at its field.
        let evaluate = ok.replace("kind = \"train\"", "kind = \"evaluate\"\nfrom_job = \"j1\"");
        assert_eq!(paths(&evaluate), ["dp.sampling_rate"]);
        // Its counts' noise is a few units: the PLD's continuous curve would
        // understate ε, so only RDP accounts it.
        let counts = evaluate.replace("sampling_rate = 0.1\n", "");
        assert!(JobSpec::parse(&counts, "f", &Limits::default()).is_ok(), "{counts}");
        assert_eq!(paths(&counts.replace("[dp]", "[dp]\naccountant = \"pld\"")), ["dp.accountant"]);
        assert_eq!(paths(&ok.replace("sampling_rate = 0.1", "sampling_rate = 0.0")), ["dp.sampling_rate"]);
        assert_eq!(paths(&ok.replace("[dp]", "[dp]\nepsilon = 1.0")), ["dp.epsilon"]);
        // Party level: distributed under secure aggregation, calibrated for
        // parties.min less the corrupt parties secagg's threat model allows
        // (⌊0.05 × 3⌋ = 0 here); round-trips; the protocol gets it.
        let party = ok.replace("sampling_rate = 0.1", "level = \"party\"");
        let s = JobSpec::parse(&party, "f", &Limits::default()).unwrap();
        let dp = s.dp.clone().unwrap();
        let want = crate::dpspec::DistributedNoise { bits: 32, max_parties: 3, honest_parties: 3 };
        assert_eq!(dp.distributed, Some(want));
        let eps = dp.epsilon(&s.training, s.rounds);
        assert!(eps <= 3.0 && eps > 2.99, "{eps}");
        assert_eq!(JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap(), s);
        let template = s.facts("j", &Limits::default()).distributed_dp.unwrap();
        assert_eq!((template.honest_parties, template.max_parties, template.bits), (3, 3, 32));
        // Ten named parties, parties.min = 3, up to 30% corrupt: no honest
        // noise is guaranteed. Unnamed parties: no party count to calibrate for.
        let ten = "names = [\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\", \"h\", \"i\", \"j\"]\nmin = 3";
        let corrupt = party
            .replace("names = [\"a\", \"b\", \"c\"]", ten)
            .replace("protocol = \"secagg\"", "protocol = \"secagg\"\n[aggregation.secagg]\ncorrupt_fraction = 0.3");
        // (Nor can a round of three hold the federation's three colluders.)
        assert_eq!(paths(&corrupt), ["aggregation.secagg.corrupt_fraction", "parties.min"]);
        // Up to 10%: one colluder, in whatever round the coordinator puts
        // it; a round of three cannot hold it (2t − n = 1, not > 1), one of
        // four can.
        let fewer = corrupt.replace("corrupt_fraction = 0.3", "corrupt_fraction = 0.1");
        assert_eq!(paths(&fewer), ["aggregation.secagg.corrupt_fraction"]);
        let s = JobSpec::parse(&fewer.replace("min = 3", "min = 4"), "f", &Limits::default()).unwrap();
        assert_eq!(s.dp.unwrap().distributed.map(|d| d.honest_parties), Some(3));
        let unnamed = party.replace("names = [\"a\", \"b\", \"c\"]", "min = 3");
        assert_eq!(paths(&unnamed), ["parties.names"]);
        // Past 20 parties secagg's rounds use sparse graphs, which do not
        // guarantee the honest noise the calibration counts on.
        let many: Vec<String> = (0..21).map(|i| format!("\"p{i}\"")).collect();
        let many = party.replace("names = [\"a\", \"b\", \"c\"]", &format!("names = [{}]", many.join(", ")));
        assert_eq!(paths(&many), ["parties.names"]);
        // The fit answer's time floor: positive, and inside the round's deadline.
        let floor = |t: &str| party.replace("[dp]", &format!("[dp]\nanswer_fit_after_secs = {t}"));
        let s = JobSpec::parse(&floor("2.5"), "f", &Limits::default()).unwrap();
        assert_eq!(s.dp.unwrap().answer_fit_after_secs, Some(2.5));
        assert_eq!(paths(&floor("0.0")), ["dp.answer_fit_after_secs"]);
        assert_eq!(paths(&format!("{}[timeouts]\nround_secs = 10\n", floor("20.0"))), ["dp.answer_fit_after_secs"]);
        // A floor must leave a second for the answer to arrive.
        assert_eq!(paths(&format!("{}[timeouts]\nround_secs = 10\n", floor("9.5"))), ["dp.answer_fit_after_secs"]);
        assert!(paths(&format!("{}[timeouts]\nround_secs = 10\n", floor("9.0"))).is_empty());
        let central = party.replace("protocol = \"secagg\"", "protocol = \"none\"");
        let s = JobSpec::parse(&central, "f", &Limits::default()).unwrap();
        assert_eq!(s.dp.as_ref().map(|d| d.level), Some(crate::dpspec::DpLevel::Party));
        assert_eq!(paths(&central.replace("[dp]", "[strategy]\nname = \"median\"\n[dp]")), ["strategy.name"]);
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;

    const BASE: &str = "name = \"m\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\"]\ndataset = \"d\"\n";

    fn errors(model: &str, rest: &str) -> Vec<String> {
        match JobSpec::parse(&format!("{BASE}[model]\n{model}\n{rest}"), "f", &Limits::default()) {
            Ok(_) => Vec::new(),
            Err(e) => e.errors.into_iter().map(|(p, _)| p).collect(),
        }
    }

    #[test]
    fn model_settings_are_checked_against_the_kind() {
        assert!(errors("kind = \"mlp\"\nclasses = 2\nhidden = [8]", "").is_empty());
        assert!(errors("kind = \"cnn\"\nclasses = 10", "").is_empty());
        assert_eq!(errors("kind = \"mlp\"\nclasses = 2\nengine = \"rust\"", ""), ["model.engine"]);
        assert_eq!(errors("kind = \"logistic_regression\"\nclasses = 2\nhidden = [8]", ""), ["model.hidden"]);
        assert_eq!(errors("kind = \"mlp\"\nclasses = 2\nhidden = [0]", ""), ["model.hidden"]);
        assert_eq!(
            errors("kind = \"cnn\"\nclasses = 10\nimage = [1, 4, 4]\nchannels = [4, 4, 4]", ""),
            ["model.channels"]
        );
        assert_eq!(errors("kind = \"mlp\"\nclasses = 2\nimage = [1, 8, 8]", ""), ["model.image"]);
        assert_eq!(errors("kind = \"torchscript\"\nclasses = 2", ""), ["model.torchscript"]);
        assert_eq!(errors("kind = \"torchscript\"\nclasses = 2\ntorchscript = \"a/b\"", ""), ["model.torchscript"]);
        assert_eq!(errors("kind = \"custom\"\nclasses = 2", ""), ["model.custom"]);
        assert_eq!(
            errors("kind = \"custom\"\nclasses = 2\ncustom = \"svm\"\nengine = \"torch\"", ""),
            ["model.engine"]
        );
        assert_eq!(errors("kind = \"mlp\"\nclasses = 2\ncustom = \"svm\"", ""), ["model.custom"]);
    }

    #[test]
    fn training_and_strategy_settings_are_checked() {
        let lr = "kind = \"logistic_regression\"\nclasses = 2";
        assert_eq!(errors(lr, "[training]\noptimizer = \"adam\""), ["training.optimizer"]);
        assert!(errors(&format!("{lr}\nengine = \"torch\""), "[training]\noptimizer = \"adam\"").is_empty());
        assert_eq!(errors(lr, "[training]\nmomentum = 1.0"), ["training.momentum"]);
        assert_eq!(errors(lr, "[training]\nproximal_mu = -1.0"), ["training.proximal_mu"]);
        let s =
            JobSpec::parse(&format!("{BASE}[model]\n{lr}\n[training]\nweight_decay = 0.5"), "f", &Limits::default());
        assert_eq!(s.map(|s| s.training.l2).ok(), Some(0.5));
        assert_eq!(errors(lr, "[strategy]\nname = \"fedprox\"\nproximal_mu = 2000.0"), ["strategy.proximal_mu"]);
        assert_eq!(errors(lr, "[strategy]\nname = \"custom\""), ["strategy.custom"]);
        assert_eq!(
            errors(lr, "[strategy]\nname = \"fedavg\"\ncustom = \"x\"\noptions = { a = 1.0 }"),
            ["strategy.custom", "strategy.options"]
        );
        assert_eq!(errors(lr, "[strategy]\nname = \"fedavg\"\nmomentum = 0.9"), ["strategy.momentum"]);
        assert_eq!(errors(lr, "[strategy]\nname = \"fedsgd\""), ["strategy.name"]);
        assert!(
            errors(lr, "[strategy]\nname = \"custom\"\ncustom = \"lr-decay\"\noptions = { gamma = 0.5 }").is_empty()
        );
    }
}

#[cfg(test)]
mod typed_tests {
    use super::*;
    use confide_algorithms::Architecture;

    const BASE: &str = "name = \"t\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n";

    #[test]
    fn strategies_and_models_become_tagged_enums_with_defaults_and_round_trip() {
        let text =
            format!("{BASE}[model]\nkind = \"cnn\"\nclasses = 10\n[strategy]\nname = \"fedadam\"\nbeta2 = 0.9\n");
        let s = JobSpec::parse(&text, "f", &Limits::default()).unwrap();
        let want = AdaptiveSettings { server_learning_rate: 0.1, beta1: 0.9, beta2: 0.9, tau: 1e-3 };
        assert_eq!(s.strategy, StrategyConfig::FedAdam(want));
        assert_eq!(s.model.architecture, Architecture::Cnn { channels: vec![16, 32], image: [1, 8, 8] });
        assert_eq!(JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap(), s);
        let custom = format!(
            "{BASE}[model]\nkind = \"mlp\"\nclasses = 2\n[strategy]\nname = \"custom\"\ncustom = \"x\"\noptions = {{ mode = \"fast\", gamma = 0.5 }}\n"
        );
        let s = JobSpec::parse(&custom, "f", &Limits::default()).unwrap();
        let StrategyConfig::Custom { name, options } = &s.strategy else { panic!("{:?}", s.strategy) };
        assert_eq!((name.as_str(), options["mode"].as_str()), ("x", Some("fast")));
        assert_eq!(JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap(), s);
    }

    #[test]
    fn extension_kinds_parse_by_name_and_keep_their_table() {
        let text = format!("{BASE}[model]\nkind = \"logistic_regression\"\nclasses = 2\n[extension]\nwindow = 3\n")
            .replace("kind = \"train\"", "kind = \"row-count\"");
        let s = JobSpec::parse(&text, "f", &Limits::default()).unwrap();
        assert_eq!(s.kind, JobKind::Extension("row-count".into()));
        assert_eq!(s.extension["window"].as_integer(), Some(3));
        let e = JobSpec::parse(&text.replace("row-count", "train"), "f", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "extension");
        let e = JobSpec::parse(&text.replace("row-count", "Row Count"), "f", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "kind");
    }
}
