//! `party.toml`: how a party reaches the coordinator, where its data lives,
//! and what it agrees to take part in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use confide_algorithms::data::DatasetSource;
use confide_proto::Limits;
use serde::{Deserialize, Serialize};

use crate::Error;

/// The party's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartyConfig {
    /// Coordinator URL, `https://host:port`.
    pub coordinator: String,
    /// Name in the coordinator's certificate (default `localhost`).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Federation CA certificate.
    pub ca: PathBuf,
    /// This party's certificate; its subject CN is the party's name.
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
    /// Data sets by name; jobs refer to these names, never to paths.
    #[serde(default)]
    pub datasets: BTreeMap<String, DatasetSource>,
    /// TorchScript model files by name, for jobs with `model.kind =
    /// "torchscript"`; paths are relative to this file.
    #[serde(default)]
    pub models: BTreeMap<String, PathBuf>,
    /// Local training settings of this machine.
    #[serde(default)]
    pub training: TrainingSettings,
    /// What this party accepts.
    #[serde(default)]
    pub policy: Policy,
    /// Reconnection back-off.
    #[serde(default)]
    pub reconnect: Reconnect,
    /// Boundary limits.
    #[serde(default)]
    pub limits: Limits,
    /// Fault injection for chaos tests; absent in production configs.
    #[serde(default)]
    pub fault: Fault,
}

/// Makes the party crash on purpose, to test the federation's dropout
/// handling with real processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Exit abruptly (status 3) on receiving a task of this stage
    /// (`setup`, `fit`, `evaluate`, `secagg-shares`, `secagg-masked-input`, `secagg-unmask`).
    #[serde(default)]
    pub exit_on_stage: Option<String>,
}

/// How this machine trains.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSettings {
    /// libtorch threads per process (1 keeps runs deterministic and is fastest
    /// for small models; raise it for large ones).
    #[serde(default = "default_threads")]
    pub threads: usize,
}

fn default_threads() -> usize {
    1
}

impl Default for TrainingSettings {
    fn default() -> Self {
        TrainingSettings { threads: default_threads() }
    }
}

fn default_server_name() -> String {
    "localhost".into()
}

/// The local policy: the hospital decides, not the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Job kinds accepted (`train`, `evaluate`).
    #[serde(default = "default_kinds")]
    pub job_kinds: Vec<String>,
    /// Privacy modes accepted (`none`, `secagg`; later `he`, `dp`).
    #[serde(default = "default_modes")]
    pub privacy_modes: Vec<String>,
    /// Fewest parties a job must require; guards against a job that would
    /// make one party's update stand out.
    #[serde(default = "default_min_parties")]
    pub min_parties: usize,
}

fn default_kinds() -> Vec<String> {
    vec!["train".into(), "evaluate".into()]
}
fn default_modes() -> Vec<String> {
    vec!["none".into()]
}
fn default_min_parties() -> usize {
    1
}

impl Default for Policy {
    fn default() -> Self {
        Policy { job_kinds: default_kinds(), privacy_modes: default_modes(), min_parties: default_min_parties() }
    }
}

/// Exponential back-off between connection attempts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconnect {
    /// First delay.
    #[serde(default = "default_initial")]
    pub initial_ms: u64,
    /// Longest delay.
    #[serde(default = "default_max")]
    pub max_ms: u64,
}

fn default_initial() -> u64 {
    200
}
fn default_max() -> u64 {
    10_000
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { initial_ms: default_initial(), max_ms: default_max() }
    }
}

impl PartyConfig {
    /// Reads a config file; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<PartyConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut cfg: PartyConfig = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.to_string().trim())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.ca = base.join(&cfg.ca);
        cfg.cert = base.join(&cfg.cert);
        cfg.key = base.join(&cfg.key);
        for d in cfg.datasets.values_mut() {
            d.path = base.join(&d.path);
        }
        for m in cfg.models.values_mut() {
            *m = base.join(&*m);
        }
        cfg.validate().map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Checks values that serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        self.limits.validate().map_err(|e| e.to_string())?;
        if !(1..=256).contains(&self.training.threads) {
            return Err(format!("training.threads: must be 1..=256 (got {})", self.training.threads));
        }
        if self.reconnect.initial_ms == 0 || self.reconnect.max_ms < self.reconnect.initial_ms {
            return Err("reconnect: need 0 < initial_ms <= max_ms".into());
        }
        for k in &self.policy.job_kinds {
            if !["train", "evaluate"].contains(&k.as_str()) {
                return Err(format!("policy.job_kinds: unknown kind {k:?} (train, evaluate)"));
            }
        }
        if let Some(stage) = &self.fault.exit_on_stage {
            let known = ["setup", "fit", "evaluate", "secagg-shares", "secagg-masked-input", "secagg-unmask"];
            if !known.contains(&stage.as_str()) {
                return Err(format!("fault.exit_on_stage: unknown stage {stage:?} ({})", known.join(", ")));
            }
        }
        for m in &self.policy.privacy_modes {
            if !["none", "secagg", "he", "dp"].contains(&m.as_str()) {
                return Err(format!("policy.privacy_modes: unknown mode {m:?} (none, secagg, he, dp)"));
            }
        }
        Ok(())
    }
}
