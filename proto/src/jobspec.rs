//! The TOML job spec: what a data scientist submits with `confide job submit`.
//!
//! [`JobSpec::parse`] reports *every* error it can find, each as
//! `FILE: field.path: what is wrong`, so a bad spec is fixed in one pass and
//! never reaches a party. See `examples/jobs/breast-cancer.toml` for a
//! commented example.

use std::collections::BTreeMap;
use std::fmt;

use confide_algorithms::{Engine, ModelConfig, OptimizerKind, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::Limits;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Federated training for `rounds` rounds.
    Train,
    /// One federated evaluation of an earlier job's model (`from_job`).
    Evaluate,
}

impl JobKind {
    /// The name used in specs, policies and status.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Train => "train",
            JobKind::Evaluate => "evaluate",
        }
    }
}

/// How updates are protected. Further modes (`he`, `dp`) plug in here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Plain updates over mutual TLS: the coordinator sees each party's update.
    #[default]
    None,
    /// SecAgg+ secure aggregation: the coordinator learns only the sum.
    Secagg,
}

impl PrivacyMode {
    /// The name used in specs, policies and status.
    pub fn as_str(self) -> &'static str {
        match self {
            PrivacyMode::None => "none",
            PrivacyMode::Secagg => "secagg",
        }
    }
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
    #[serde(default)]
    pub datasets: BTreeMap<String, String>,
}

/// The aggregation strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyName {
    /// Example-weighted federated averaging.
    #[default]
    Fedavg,
    /// FedAvg with a proximal term in local training (FedProx).
    Fedprox,
    /// FedAvg with server momentum.
    Fedavgm,
    /// Adaptive server optimiser: Adagrad.
    Fedadagrad,
    /// Adaptive server optimiser: Yogi.
    Fedyogi,
    /// Adaptive server optimiser: Adam.
    Fedadam,
    /// Coordinate-wise median (robust; plaintext only).
    Median,
    /// Coordinate-wise trimmed mean (robust; plaintext only).
    TrimmedMean,
    /// Krum (robust; plaintext only).
    Krum,
    /// A strategy registered with the coordinator by a researcher's own build
    /// (see `examples/custom_strategy.rs`); `strategy.custom` names it.
    Custom,
}

impl StrategyName {
    /// Whether the rule needs individual updates (so cannot run on a secure sum).
    pub fn is_robust(self) -> bool {
        matches!(self, StrategyName::Median | StrategyName::TrimmedMean | StrategyName::Krum)
    }
}

/// The strategy table.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySpec {
    /// Which strategy.
    #[serde(default)]
    pub name: StrategyName,
    /// fedavgm / fedad*: server learning rate (default 1.0 for fedavgm, 0.1 for fedad*).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_learning_rate: Option<f64>,
    /// fedavgm: server momentum (default 0.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    /// fedad*: β₁ (default 0.9).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// fedyogi / fedadam: β₂ (default 0.99).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta2: Option<f64>,
    /// fedad*: adaptivity τ (default 1e-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// trimmed_mean: fraction trimmed at each end, [0, 0.5) (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trim_fraction: Option<f64>,
    /// fedprox: μ of the proximal term μ/2·‖w − w_global‖² (default 0.01).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proximal_mu: Option<f64>,
    /// krum: Byzantine parties tolerated (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<usize>,
    /// custom: the registered strategy's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<String>,
    /// custom: numeric options handed to the registered strategy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, f64>,
}

/// The privacy table.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// How updates are protected.
    #[serde(default)]
    pub mode: PrivacyMode,
    /// secagg: fraction of a party's neighbours whose shares rebuild its
    /// secrets, in (0.5, 1]; default 0.6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// secagg: bits of the modulus the encoded sum lives in, 16..=32; default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u32>,
    /// secagg: each coordinate of a party's (example-weighted) update is
    /// clipped to [-clip, clip]; default 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
    /// secagg: the most training examples one party may weigh in with; its
    /// update is scaled by n/max_examples before encoding; default 100000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_examples: Option<u64>,
}

/// Resolved secure-aggregation settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecAggSettings {
    /// Threshold as a fraction of the degree.
    pub threshold: f64,
    /// Modulus bits.
    pub bits: u32,
    /// Coordinate clip.
    pub clip: f32,
    /// Weight cap.
    pub max_examples: u64,
}

impl PrivacySpec {
    /// The secure-aggregation settings with defaults filled in.
    pub fn secagg(&self) -> SecAggSettings {
        SecAggSettings {
            threshold: self.threshold.unwrap_or(0.6),
            bits: self.bits.unwrap_or(32),
            clip: self.clip.unwrap_or(1.0),
            max_examples: self.max_examples.unwrap_or(100_000),
        }
    }
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
}

fn default_recruit() -> u64 {
    60
}
fn default_round() -> u64 {
    300
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts { recruit_secs: default_recruit(), round_secs: default_round() }
    }
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Human-readable name.
    pub name: String,
    /// What the job does.
    pub kind: JobKind,
    /// Training rounds (1 for `evaluate`).
    #[serde(default = "one")]
    pub rounds: u32,
    /// Start from (`train`) or evaluate (`evaluate`) this earlier job's model.
    #[serde(default)]
    pub from_job: Option<String>,
    /// Who takes part.
    pub parties: PartiesSpec,
    /// How updates are combined.
    #[serde(default)]
    pub strategy: StrategySpec,
    /// The model.
    pub model: ModelConfig,
    /// Local training settings.
    #[serde(default)]
    pub training: TrainConfig,
    /// Evaluation cadence.
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// Privacy protection.
    #[serde(default)]
    pub privacy: PrivacySpec,
    /// Deadlines.
    #[serde(default)]
    pub timeouts: Timeouts,
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
    /// Parses and validates a spec. `file` names the source in errors.
    pub fn parse(text: &str, file: &str, limits: &Limits) -> Result<JobSpec, SpecErrors> {
        let fail = |path: &str, msg: String| SpecErrors { file: file.to_owned(), errors: vec![(path.to_owned(), msg)] };
        if text.len() > limits.max_spec_bytes {
            return Err(fail("(file)", format!("{} bytes; the limit is {}", text.len(), limits.max_spec_bytes)));
        }
        let de = toml::Deserializer::parse(text).map_err(|e| fail("(syntax)", one_line(&e.to_string())))?;
        let spec: JobSpec = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            fail(if path == "." { "(top level)" } else { &path }, one_line(&e.into_inner().to_string()))
        })?;
        let errors = spec.validate(limits);
        if errors.is_empty() { Ok(spec) } else { Err(SpecErrors { file: file.to_owned(), errors }) }
    }

    /// The minimum number of parties, resolved.
    pub fn min_parties(&self) -> usize {
        self.parties.min.unwrap_or(self.parties.names.len().max(1))
    }

    /// The data set `party` should use.
    pub fn dataset_for(&self, party: &str) -> &str {
        self.parties.datasets.get(party).map(String::as_str).unwrap_or(&self.parties.dataset)
    }

    /// Serialises back to TOML (what parties receive).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Semantic checks; returns every `(path, message)` problem.
    pub fn validate(&self, limits: &Limits) -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = Vec::new();
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
        match (self.kind, &self.from_job) {
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
        for (i, n) in names.iter().enumerate() {
            if let Err(x) = confide_crypto_name_check(n) {
                err(&format!("parties.names[{i}]"), x);
            }
            if names[..i].contains(n) {
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
        for msg in self.model.validate() {
            let (field, rest) = msg.split_once(": ").unwrap_or(("", &msg));
            err(&format!("model.{field}"), rest.to_owned());
        }
        if self.model.engine() == Engine::Rust && self.training.optimizer != OptimizerKind::Sgd {
            err("training.optimizer", "the rust engine trains with SGD; set model.engine = \"torch\"".into());
        }
        for msg in self.training.validate() {
            let (field, rest) = msg.split_once(": ").unwrap_or(("", &msg));
            err(&format!("training.{field}"), rest.to_owned());
        }
        if self.evaluation.every == 0 {
            err("evaluation.every", "must be at least 1".into());
        }
        let st = &self.strategy;
        let in01 = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && (0.0..1.0).contains(&v));
        if st.server_learning_rate.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            err("strategy.server_learning_rate", "must be positive and finite".into());
        }
        for (field, v) in [("momentum", st.momentum), ("beta1", st.beta1), ("beta2", st.beta2)] {
            if !in01(v) {
                err(&format!("strategy.{field}"), "must be in [0, 1)".into());
            }
        }
        if st.tau.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            err("strategy.tau", "must be positive and finite".into());
        }
        if st.proximal_mu.is_some_and(|v| !(v.is_finite() && (0.0..=1000.0).contains(&v))) {
            err("strategy.proximal_mu", "must be in [0, 1000]".into());
        }
        if st.trim_fraction.is_some_and(|v| !(v.is_finite() && (0.0..0.5).contains(&v))) {
            err("strategy.trim_fraction", "must be in [0, 0.5)".into());
        }
        match (&st.custom, st.name) {
            (None, StrategyName::Custom) => {
                err("strategy.custom", "name the registered strategy (name = \"custom\")".into())
            }
            (Some(c), StrategyName::Custom) => {
                if c.is_empty() || c.len() > 64 || !c.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_".contains(ch))
                {
                    err("strategy.custom", format!("{c:?} is not a strategy name (letters, digits, '-', '_')"));
                }
            }
            (Some(_), _) => err("strategy.custom", "only applies to name = \"custom\"".into()),
            (None, _) => {}
        }
        if st.name != StrategyName::Custom && !st.options.is_empty() {
            err("strategy.options", "only applies to name = \"custom\"".into());
        }
        if let Some((k, v)) = st.options.iter().find(|(k, v)| !v.is_finite() || k.is_empty() || k.len() > 64) {
            err(&format!("strategy.options.{k}"), format!("must be a finite number under a short name (got {v})"));
        }
        if st.name == StrategyName::Krum {
            let f = st.byzantine.unwrap_or(1);
            if self.min_parties() < 2 * f + 3 {
                err(
                    "strategy.byzantine",
                    format!("krum with {f} byzantine parties needs parties.min >= {}", 2 * f + 3),
                );
            }
        }
        let p = &self.privacy;
        if p.mode == PrivacyMode::Secagg && st.name.is_robust() {
            err(
                "strategy.name",
                format!("{:?} needs individual updates; privacy.mode = \"secagg\" reveals only their sum", st.name),
            );
        }
        if p.mode == PrivacyMode::Secagg {
            let sa = p.secagg();
            if !(sa.threshold > 0.5 && sa.threshold <= 1.0) {
                err("privacy.threshold", format!("must be in (0.5, 1] (got {})", sa.threshold));
            }
            if !(16..=32).contains(&sa.bits) {
                err("privacy.bits", format!("must be 16..=32 (got {})", sa.bits));
            }
            if !(sa.clip.is_finite() && sa.clip > 0.0) {
                err("privacy.clip", format!("must be positive and finite (got {})", sa.clip));
            }
            let parties = if names.is_empty() { limits.max_parties } else { names.len() };
            if sa.max_examples == 0 || (sa.max_examples as u128) * (parties as u128) >= 1u128 << sa.bits.min(32) {
                err(
                    "privacy.max_examples",
                    format!("must be positive and {parties} × max_examples must fit in {} bits", sa.bits),
                );
            } else if (((1u64 << sa.bits.min(32)) - 1) / parties as u64) < 256 {
                err("privacy.bits", format!("{} bits are too few for {parties} parties", sa.bits));
            }
            if self.min_parties() < 2 {
                err("parties.min", "secure aggregation needs at least 2 parties".into());
            }
        } else {
            for (field, set) in [
                ("threshold", p.threshold.is_some()),
                ("bits", p.bits.is_some()),
                ("clip", p.clip.is_some()),
                ("max_examples", p.max_examples.is_some()),
            ] {
                if set {
                    err(
                        &format!("privacy.{field}"),
                        format!("only applies to mode \"secagg\" (mode is {:?})", p.mode.as_str()),
                    );
                }
            }
        }
        if !(1..=86_400).contains(&self.timeouts.recruit_secs) {
            err("timeouts.recruit_secs", format!("must be 1..=86400 (got {})", self.timeouts.recruit_secs));
        }
        if !(1..=86_400).contains(&self.timeouts.round_secs) {
            err("timeouts.round_secs", format!("must be 1..=86400 (got {})", self.timeouts.round_secs));
        }
        e
    }
}

/// Same rule as `confide_crypto::pki::validate_party_name`, restated here so
/// the wire crate does not depend on the PKI.
fn confide_crypto_name_check(n: &str) -> Result<(), String> {
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
        assert_eq!(s.privacy.mode, PrivacyMode::None);
        assert_eq!(s.dataset_for("hospital-a"), "breast-cancer");
        let again = JobSpec::parse(&s.to_toml(), "x", &Limits::default()).unwrap();
        assert_eq!(again, s);
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
        let spec = format!("{BASE}[strategy]\nname = \"median\"\n[privacy]\nmode = \"secagg\"\n");
        let e = JobSpec::parse(&spec, "f", &Limits::default()).unwrap_err();
        assert_eq!(e.errors[0].0, "strategy.name");
        assert!(e.errors[0].1.contains("reveals only their sum"));
        let ok = format!("{BASE}[strategy]\nname = \"fedadam\"\ntau = 0.01\n[privacy]\nmode = \"secagg\"\n");
        JobSpec::parse(&ok, "f", &Limits::default()).unwrap();
        let bad = format!("{BASE}[strategy]\nname = \"krum\"\nbeta1 = 1.5\n");
        let e = JobSpec::parse(&bad, "f", &Limits::default()).unwrap_err();
        let paths: Vec<&str> = e.errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, vec!["strategy.beta1", "strategy.byzantine"]);
    }
}

#[cfg(test)]
mod privacy_tests {
    use super::*;

    const BASE: &str = "name = \"s\"\nkind = \"train\"\n[parties]\nnames = [\"a\", \"b\", \"c\"]\ndataset = \"d\"\n\
                        [model]\nkind = \"logistic_regression\"\nclasses = 2\n";

    #[test]
    fn secagg_settings_have_safe_defaults_and_are_validated() {
        let s = JobSpec::parse(&format!("{BASE}[privacy]\nmode = \"secagg\"\n"), "f", &Limits::default()).unwrap();
        assert_eq!(s.privacy.secagg(), SecAggSettings { threshold: 0.6, bits: 32, clip: 1.0, max_examples: 100_000 });
        let bad = format!("{BASE}[privacy]\nmode = \"secagg\"\nthreshold = 0.4\nbits = 40\nclip = -1.0\n");
        let e = JobSpec::parse(&bad, "f", &Limits::default()).unwrap_err();
        let paths: Vec<&str> = e.errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, vec!["privacy.threshold", "privacy.bits", "privacy.clip"]);
        let e = JobSpec::parse(&format!("{BASE}[privacy]\nmode = \"secagg\"\nbits = 16\n"), "f", &Limits::default())
            .unwrap_err();
        assert_eq!(e.errors[0].0, "privacy.max_examples");
        let e = JobSpec::parse(&format!("{BASE}[privacy]\nmode = \"none\"\nbits = 32\n"), "f", &Limits::default())
            .unwrap_err();
        assert_eq!(e.errors[0].0, "privacy.bits");
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
        assert!(
            errors(lr, "[strategy]\nname = \"custom\"\ncustom = \"lr-decay\"\noptions = { gamma = 0.5 }").is_empty()
        );
    }
}
