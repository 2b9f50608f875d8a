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
    /// The relay this party dials instead of the coordinator (`confide
    /// relay`), by the name in its certificate. Without it the party talks
    /// only to a server with the coordinator's certificate, and never
    /// delegates its stream to a relay it did not choose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Federation CA certificate.
    pub ca: PathBuf,
    /// This party's certificate; its subject CN is the party's name.
    pub cert: PathBuf,
    /// This party's private key.
    pub key: PathBuf,
    /// Where the party keeps the newest revocation list it has accepted
    /// (default: next to its key, `NAME.crl.pem` for `NAME.key`), so that
    /// after a restart it still refuses an older list.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
    /// The privacy ledger: what each data set has spent in ε (default: next
    /// to the key, `NAME.ledger.json` for `NAME.key`). See `confide-party budget`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger: Option<PathBuf>,
    /// The audit log of forwarded inputs, JSON lines (default: next to the
    /// key, `NAME.audit.jsonl` for `NAME.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_log: Option<PathBuf>,
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
    /// Serving deployed models to this hospital's applications.
    #[serde(default)]
    pub serve: ServeConfig,
    /// Joint inference: this party answers other parties' hard examples.
    #[serde(default)]
    pub cloud: CloudConfig,
    /// Fault injection for chaos tests; absent in production configs.
    #[serde(default)]
    pub fault: Fault,
    /// Prometheus metrics for the hospital's monitoring: off unless
    /// `listen` is set.
    #[serde(default)]
    pub metrics: confide_proto::telemetry::MetricsConfig,
    /// Deprecations found while loading (logged at start).
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// `[cloud]`: the services whose hard examples this party answers for edge
/// parties (joint inference). Each must be in `[serve] services` too: the
/// cloud model is a deployment like any other.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// The cloud services.
    #[serde(default)]
    pub services: Vec<String>,
    /// The edge parties whose forwarded requests it answers; empty (the
    /// default): any party of the federation, as long as the request
    /// carries that party's signature.
    #[serde(default)]
    pub accept_from: Vec<String>,
}

/// `[serve]`: which services this party serves, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// The services whose deployments this party pulls and serves; any
    /// other deployment is ignored.
    #[serde(default)]
    pub services: Vec<String>,
    /// The local HTTP endpoint (`POST /v1/services/NAME/predict`, `GET
    /// /healthz`); none by default. Keep it on a loopback or hospital-internal
    /// address: it has no authentication of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<std::net::SocketAddr>,
    /// Where verified deployments and their models are kept (default: next
    /// to the key, `NAME.serve/` for `NAME.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Most rows one batch of concurrent requests is answered in.
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// Most rows in one request.
    #[serde(default = "default_max_rows")]
    pub max_rows: usize,
    /// Largest request body, bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Host names (besides `localhost` and IP addresses) the endpoint
    /// answers for: a request's `Host` header must name one of them (any
    /// port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Tell the coordinator, every 10 s while it changes, how many requests
    /// and rows each service answered and how many rows went to the cloud
    /// tier (counts since this node started; never rows or answers), so
    /// that the administrator's dashboard shows the forwarded fraction.
    /// Unset: on, unless the policy asks for DP (`max_epsilon` or
    /// `require_dp`), where the exact count of hard rows would tell the
    /// coordinator, outside the ledger, how many rows a pipeline's DP job
    /// trains on ([`PartyConfig::reports_serving_counts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_counts: Option<bool>,
    /// Service → the data set its labelled hard examples belong to: a
    /// pipeline job on another data set leaves them out, also when it
    /// reaches the same rows through another service. A service not
    /// named here gives them to the first data set whose pipeline job uses
    /// them, which is the coordinator's choice (it names the pipeline's
    /// service and data set).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labelled_rows_dataset: BTreeMap<String, String>,
    /// Service → the oldest deployment sequence this party takes of it. A
    /// party that holds no deployment of a service yet (a new party, a
    /// service newly served, a wiped `dir`) has no record of what it took
    /// before, so the coordinator could hand it any old signed deployment
    /// (one an administrator has since rolled back); set this to the
    /// service's current sequence, as the administrator publishes it, when
    /// adding the service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub min_sequence: BTreeMap<String, u64>,
}

fn default_max_batch_rows() -> usize {
    1024
}
fn default_max_rows() -> usize {
    4096
}
fn default_max_body_bytes() -> usize {
    4 << 20
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            services: Vec::new(),
            listen: None,
            dir: None,
            max_batch_rows: default_max_batch_rows(),
            max_rows: default_max_rows(),
            max_body_bytes: default_max_body_bytes(),
            allow_hosts: Vec::new(),
            report_counts: None,
            labelled_rows_dataset: BTreeMap::new(),
            min_sequence: BTreeMap::new(),
        }
    }
}

impl ServeConfig {
    fn validate(&self) -> Result<(), String> {
        for (i, s) in self.services.iter().enumerate() {
            confide_proto::deploy::validate_service_name(s).map_err(|e| format!("serve.services[{i}]: {e}"))?;
            if self.services[..i].contains(s) {
                return Err(format!("serve.services[{i}]: {s:?} is listed twice"));
            }
        }
        if self.listen.is_some() && self.services.is_empty() {
            return Err("serve.listen: list the services to serve in serve.services".into());
        }
        if !(1..=1_000_000).contains(&self.max_batch_rows) {
            return Err(format!("serve.max_batch_rows: must be 1..=1000000 (got {})", self.max_batch_rows));
        }
        if !(1..=1_000_000).contains(&self.max_rows) {
            return Err(format!("serve.max_rows: must be 1..=1000000 (got {})", self.max_rows));
        }
        if !(1024..=1 << 30).contains(&self.max_body_bytes) {
            return Err(format!("serve.max_body_bytes: must be 1 KiB..=1 GiB (got {})", self.max_body_bytes));
        }
        confide_proto::net::check_host_names("serve.allow_hosts", &self.allow_hosts)
    }
}

/// Makes the party crash on purpose, to test the federation's dropout
/// handling with real processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Exit abruptly (status 3) on receiving a task of this stage (`setup`,
    /// `fit`, `evaluate`, or a protocol step such as `secagg-masked-input`).
    #[serde(default)]
    pub exit_on_stage: Option<String>,
    /// Only on a task of this round (0 is setup): a protocol's steps run in
    /// setup and evaluation too under secure aggregation.
    #[serde(default)]
    pub exit_on_round: Option<u32>,
}

/// How this machine trains.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSettings {
    /// libtorch threads per process (1 keeps runs deterministic and is fastest
    /// for small models; raise it for large ones).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Under distributed DP, rounds of noise drawn ahead (1 to 64; default
    /// 1, the next round's, drawn between rounds). Each costs 4 bytes per
    /// model value, padded to a power of two (kept modulo 2^b); more lets a
    /// party that is busy between rounds draw the noise of several at once,
    /// before the job's first round. Under `he`,
    /// likewise the rounds of encryption randomness and flooding noise
    /// drawn ahead (24 bytes per value each).
    #[serde(default = "default_noise_rounds_ahead")]
    pub dp_noise_rounds_ahead: usize,
}

fn default_noise_rounds_ahead() -> usize {
    1
}

fn default_threads() -> usize {
    1
}

impl Default for TrainingSettings {
    fn default() -> Self {
        TrainingSettings { threads: default_threads(), dp_noise_rounds_ahead: default_noise_rounds_ahead() }
    }
}

fn default_server_name() -> String {
    "localhost".into()
}

/// The local policy: the hospital decides, not the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Job kinds accepted (`train`, `evaluate`, or a kind this build registers).
    #[serde(default = "default_kinds")]
    pub job_kinds: Vec<String>,
    /// Aggregation protocols accepted (`none`, `secagg`, `he`, or one this build
    /// registers): e.g. `["secagg"]` requires secure aggregation.
    #[serde(default = "default_aggregation")]
    pub aggregation: Vec<String>,
    /// Refuse every job without differential privacy.
    #[serde(default)]
    pub require_dp: bool,
    /// The most record-level ε a job may cost each data set; a job without
    /// differential privacy costs ε = ∞, so it is refused whenever this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epsilon: Option<f64>,
    /// The most δ the jobs on each data set may sum to (each job's δ adds
    /// up, as the ledger composes jobs): without it, many jobs of small ε
    /// would each bring their own δ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delta: Option<f64>,
    /// Training rounds a DP job may run beyond its spec's `rounds` (a
    /// coordinator that re-runs a round after a restart), each charged to
    /// the ledger before it runs; past them the party leaves the job.
    /// Without it a coordinator could grow a job's ε until the budget (or,
    /// with `require_dp` alone, without end).
    #[serde(default = "default_max_extra_rounds")]
    pub max_extra_rounds: u32,
    /// Most jobs this party runs at once (each holds a worker thread, a
    /// model and an inbox of tasks); an offer beyond them is refused. A
    /// job counts from its acceptance until it ends or the coordinator's
    /// connection does.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// The least time, in seconds, between two training jobs of one
    /// incremental pipeline at this party: a later one is refused before
    /// its ε is reserved. The pipeline's `max_iterations` is the
    /// coordinator's to keep, and a party accepts a training job whether or
    /// not new rows arrived; this bounds a runaway or over-eager pipeline.
    /// It is keyed by the pipeline id the coordinator names, so a
    /// coordinator that deviates (a new pipeline id each time, up to the 64
    /// kept, or a training job without `[pipeline]` on the watched data
    /// set) is not held by it: the ledger's `max_epsilon` stays the hard
    /// cap. Time, not rows: a cap on new rows would tell the coordinator
    /// when rows arrive. Unset by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pipeline_train_secs: Option<u64>,
    /// Run an incremental pipeline's evaluate jobs (its row counts and gate
    /// metrics over a watched directory's batches, summed through the job's
    /// aggregation protocol) although `require_dp` or `max_epsilon` is set.
    /// They carry no differential privacy: what they reveal (aggregate
    /// counts, losses and accuracies on held-out and new rows) is outside
    /// the ε this party accounts, and the coordinator may start as many as
    /// it likes. An evaluate job on a data set file is refused whatever
    /// this says. Off by default.
    #[serde(default)]
    pub evaluations_outside_budget: bool,
    /// Hold each fit answer of a DP training job, and a DP evaluation's
    /// answer to its evaluate task, at least this many seconds after its
    /// task was taken up (and every job offer's answer as long after the offer came: accepting reads the
    /// rows), whatever the spec's `dp.answer_fit_after_secs` (the
    /// coordinator's choice, which wins only when longer), so that how
    /// long the rows took to train on or score, a hint of the data set's
    /// size, does not show unless it takes longer. A job whose
    /// `timeouts.round_secs` (or `timeouts.recruit_secs`) does not leave a
    /// second after the floor is refused: its answers would not arrive in
    /// time; so is one whose `timeouts.straggler_secs` would cut them off
    /// once the others answered (at the spec's own floor). Unset by default:
    /// the spec decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_answer_after_secs: Option<f64>,
    /// Accept party-level DP whose noise the coordinator adds (`[dp] level
    /// = "party"`, central DP-FedAvg). Off by default: it trusts the
    /// coordinator, which then sees every update before the noise (under
    /// adaptive clipping, clipped by the party only at 2^20 times the
    /// spec's first clip, the largest a round may use).
    #[serde(default)]
    pub accept_central_dp: bool,
    /// The least fraction of a round's parties that the job's aggregation
    /// protocol must tolerate being corrupt (colluding with the
    /// coordinator and deviating from the protocol): secure aggregation's
    /// parameters and distributed DP's noise are calibrated for the spec's
    /// `corrupt_fraction`, so a spec below this hospital's own assumption
    /// is refused. Above 0 it refuses `he`, which tolerates no such party.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_corrupt_fraction: Option<f64>,
    /// The most DP-SGD steps one round may ask of this party
    /// (`training.local_epochs` ÷ `dp.sampling_rate`): the spec's own bound
    /// is on the privacy accounting, and a coordinator could otherwise keep
    /// a party training one round for days at a tiny ε (found by review).
    #[serde(default = "default_max_dp_steps_per_round")]
    pub max_dp_steps_per_round: u64,
    /// Fewest parties a job must require; guards against a job that would
    /// make one party's update stand out.
    #[serde(default = "default_min_parties")]
    pub min_parties: usize,
    /// Joint inference: for each service, the cloud parties allowed to
    /// receive its raw inputs (encrypted to them). A service not listed
    /// never forwards an input; its unsure answers are flagged `hard`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub share_inputs: BTreeMap<String, Vec<String>>,
    /// Deprecated name of `aggregation`.
    #[serde(default, skip_serializing)]
    pub privacy_modes: Option<Vec<String>>,
}

impl Policy {
    /// Whether inputs of `service` may go to cloud party `cloud`.
    pub fn may_share_inputs(&self, service: &str, cloud: &str) -> bool {
        self.share_inputs.get(service).is_some_and(|allowed| allowed.iter().any(|c| c == cloud))
    }
}

fn default_kinds() -> Vec<String> {
    vec!["train".into(), "evaluate".into()]
}
fn default_aggregation() -> Vec<String> {
    vec!["none".into()]
}
fn default_min_parties() -> usize {
    1
}
/// Highest `policy.max_jobs` (one thread each).
const MAX_JOBS_CEILING: usize = 1024;

fn default_max_jobs() -> usize {
    16
}
fn default_max_extra_rounds() -> u32 {
    crate::ledger::DEFAULT_EXTRA_ROUNDS
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            job_kinds: default_kinds(),
            aggregation: default_aggregation(),
            require_dp: false,
            max_epsilon: None,
            max_delta: None,
            max_extra_rounds: default_max_extra_rounds(),
            max_jobs: default_max_jobs(),
            min_pipeline_train_secs: None,
            evaluations_outside_budget: false,
            min_answer_after_secs: None,
            accept_central_dp: false,
            min_corrupt_fraction: None,
            max_dp_steps_per_round: default_max_dp_steps_per_round(),
            min_parties: default_min_parties(),
            share_inputs: BTreeMap::new(),
            privacy_modes: None,
        }
    }
}

fn default_max_dp_steps_per_round() -> u64 {
    100_000
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
/// The longest reconnection delay a party accepts: a day.
const MAX_RECONNECT_MS: u64 = 86_400_000;
fn default_max() -> u64 {
    10_000
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { initial_ms: default_initial(), max_ms: default_max() }
    }
}

impl PartyConfig {
    /// The identity this party dials the coordinator with.
    pub fn client_identity(&self) -> confide_proto::net::ClientIdentity<'_> {
        confide_proto::net::ClientIdentity {
            url: &self.coordinator,
            server_name: &self.server_name,
            ca: &self.ca,
            cert: &self.cert,
            key: &self.key,
        }
    }

    /// Whether this party reports its serving counts (`[serve]
    /// report_counts`): as set, or when unset, only while the policy does
    /// not ask for DP. A hospital that keeps a privacy budget sends no exact
    /// count the ledger does not cover unless it says so.
    pub fn reports_serving_counts(&self) -> bool {
        self.serve.report_counts.unwrap_or(!(self.policy.require_dp || self.policy.max_epsilon.is_some()))
    }

    /// Reads a config file; relative paths are taken from the file's directory.
    pub fn load(path: &Path) -> Result<PartyConfig, Error> {
        Self::load_with(path, &crate::plugins::PartyPlugins::default())
    }

    /// [`PartyConfig::load`] for a build that registers further protocols or kinds.
    pub fn load_with(path: &Path, plugins: &crate::plugins::PartyPlugins) -> Result<PartyConfig, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let mut cfg: PartyConfig = toml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), e.to_string().trim())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.ca = base.join(&cfg.ca);
        cfg.cert = base.join(&cfg.cert);
        cfg.key = base.join(&cfg.key);
        if let Some(l) = &mut cfg.ledger {
            *l = base.join(&*l);
        }
        if let Some(r) = cfg.revocation_list.as_mut() {
            *r = base.join(&*r);
        }
        for d in cfg.datasets.values_mut() {
            d.path = base.join(&d.path);
        }
        for m in cfg.models.values_mut() {
            *m = base.join(&*m);
        }
        if let Some(a) = &mut cfg.audit_log {
            *a = base.join(&*a);
        }
        if let Some(d) = &mut cfg.serve.dir {
            *d = base.join(&*d);
        }
        cfg.validate_with(plugins).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        for w in &mut cfg.warnings {
            *w = format!("{}: {w}", path.display());
        }
        Ok(cfg)
    }

    /// The privacy ledger's file.
    pub fn ledger_path(&self) -> PathBuf {
        self.ledger.clone().unwrap_or_else(|| self.key.with_extension("ledger.json"))
    }

    /// The audit log: every input this party forwarded, and to whom.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log.clone().unwrap_or_else(|| self.key.with_extension("audit.jsonl"))
    }

    /// Which batches of its watched data sets each incremental pipeline has
    /// trained on (next to the key, `NAME.pipelines.json`).
    pub fn pipelines_path(&self) -> PathBuf {
        self.key.with_extension("pipelines.json")
    }

    /// The hard examples met while serving, kept for labelling, beside the
    /// audit log (`NAME.hard-examples.csv`).
    pub fn hard_examples_path(&self) -> PathBuf {
        self.beside_audit_log("hard-examples.csv")
    }

    /// The hospital's labels of hard examples (`sha256,label` lines), beside
    /// the audit log (`NAME.labels.csv`).
    pub fn labels_path(&self) -> PathBuf {
        self.beside_audit_log("labels.csv")
    }

    fn beside_audit_log(&self, suffix: &str) -> PathBuf {
        let stem = self.key.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "party".into());
        self.audit_log_path().with_file_name(format!("{stem}.{suffix}"))
    }

    /// Where verified deployments and their models are kept.
    pub fn serve_dir(&self) -> PathBuf {
        self.serve.dir.clone().unwrap_or_else(|| self.key.with_extension("serve"))
    }

    /// Where the newest accepted revocation list is kept.
    pub fn revocation_list_path(&self) -> PathBuf {
        self.revocation_list.clone().unwrap_or_else(|| self.key.with_extension("crl.pem"))
    }

    /// Checks values that serde cannot, against the built-in protocols and kinds.
    pub fn validate(&mut self) -> Result<(), String> {
        self.validate_with(&crate::plugins::PartyPlugins::default())
    }

    /// Checks values that serde cannot, against what `plugins` registers;
    /// moves the deprecated `policy.privacy_modes` to `policy.aggregation`.
    pub fn validate_with(&mut self, plugins: &crate::plugins::PartyPlugins) -> Result<(), String> {
        self.limits.validate().map_err(|e| e.to_string())?;
        if let Some(r) = &self.relay {
            confide_crypto::pki::validate_party_name(r).map_err(|e| format!("relay: {e}"))?;
        }
        self.serve.validate()?;
        confide_proto::net::check_host_names("metrics.allow_hosts", &self.metrics.allow_hosts)?;
        for (i, s) in self.cloud.services.iter().enumerate() {
            if !self.serve.services.contains(s) {
                return Err(format!(
                    "cloud.services[{i}]: {s:?} must also be in serve.services (its model is deployed)"
                ));
            }
        }
        for (i, p) in self.cloud.accept_from.iter().enumerate() {
            confide_crypto::pki::validate_party_name(p).map_err(|e| format!("cloud.accept_from[{i}]: {e}"))?;
        }
        for (service, clouds) in &self.policy.share_inputs {
            confide_proto::deploy::validate_service_name(service).map_err(|e| format!("policy.share_inputs: {e}"))?;
            for (i, c) in clouds.iter().enumerate() {
                confide_crypto::pki::validate_party_name(c)
                    .map_err(|e| format!("policy.share_inputs.{service}[{i}]: {e}"))?;
            }
        }
        for (service, dataset) in &self.serve.labelled_rows_dataset {
            confide_proto::deploy::validate_service_name(service)
                .map_err(|e| format!("serve.labelled_rows_dataset.{service}: {e}"))?;
            if !self.serve.services.contains(service) {
                // Still applied: the hard examples it kept while it was
                // served stay in the file.
                self.warnings.push(format!(
                    "serve.labelled_rows_dataset.{service}: not in serve.services (applied to the hard examples \
                     already kept)"
                ));
            }
            if !self.datasets.contains_key(dataset) {
                return Err(format!("serve.labelled_rows_dataset.{service}: no data set {dataset:?} in [datasets]"));
            }
        }
        for (service, floor) in &self.serve.min_sequence {
            confide_proto::deploy::validate_service_name(service)
                .map_err(|e| format!("serve.min_sequence.{service}: {e}"))?;
            if *floor == 0 {
                return Err(format!("serve.min_sequence.{service}: sequences start at 1"));
            }
            if !self.serve.services.contains(service) {
                self.warnings.push(format!("serve.min_sequence.{service}: not in serve.services (no effect)"));
            }
        }
        for (name, d) in &self.datasets {
            if d.features.is_some_and(|f| !(1..=1_000_000).contains(&f)) {
                return Err(format!("datasets.{name}.features: must be 1..=1000000 (got {:?})", d.features));
            }
            if d.max_bytes == Some(0) {
                return Err(format!("datasets.{name}.max_bytes: must be at least 1"));
            }
        }
        overlapping_datasets(&self.datasets)?;
        if !(1..=64).contains(&self.training.dp_noise_rounds_ahead) {
            return Err(format!(
                "training.dp_noise_rounds_ahead: must be 1..=64 (got {})",
                self.training.dp_noise_rounds_ahead
            ));
        }
        if !(1..=256).contains(&self.training.threads) {
            return Err(format!("training.threads: must be 1..=256 (got {})", self.training.threads));
        }
        if self.reconnect.initial_ms == 0 || self.reconnect.max_ms < self.reconnect.initial_ms {
            return Err("reconnect: need 0 < initial_ms <= max_ms".into());
        }
        // A ceiling: the back-off doubles and adds jitter, which past it
        // would overflow (found by review).
        if self.reconnect.max_ms > MAX_RECONNECT_MS {
            return Err(format!("reconnect.max_ms: at most {MAX_RECONNECT_MS} (a day; got {})", self.reconnect.max_ms));
        }
        let kinds = plugins.kind_names();
        for k in &self.policy.job_kinds {
            if !kinds.contains(&k.as_str()) {
                return Err(format!("policy.job_kinds: unknown kind {k:?} ({})", kinds.join(", ")));
            }
        }
        let protocols = plugins.protocols().names();
        if let Some(legacy) = self.policy.privacy_modes.take() {
            if self.policy.aggregation != default_aggregation() {
                return Err("policy.privacy_modes: deprecated; give policy.aggregation only".into());
            }
            // "he" and "dp" were accepted names before either existed.
            let (known, dropped): (Vec<String>, Vec<String>) =
                legacy.into_iter().partition(|m| protocols.contains(&m.as_str()));
            let mut w = format!("policy.privacy_modes is deprecated: write policy.aggregation = {known:?}");
            if !dropped.is_empty() {
                w.push_str(&format!(" ({} ignored: not aggregation protocols of this build)", dropped.join(", ")));
            }
            self.warnings.push(w);
            self.policy.aggregation = known;
        }
        // A protocol that tolerates no deviating colluder (`he`: 0 at its
        // default settings, and at any) can never be accepted under a
        // floor: said at start, not first at an offer.
        if let Some(floor) = self.policy.min_corrupt_fraction.filter(|f| *f > 0.0) {
            for m in &self.policy.aggregation {
                if let Some(protocol) = plugins.protocols().get(m)
                    && protocol.tolerated_corrupt_fraction(&toml::Table::new()) == Some(0.0)
                {
                    self.warnings.push(format!(
                        "policy.aggregation accepts {m:?}, which tolerates no corrupt party that deviates; with \
                         policy.min_corrupt_fraction = {floor} this party refuses every {m} job"
                    ));
                }
            }
        }
        for m in &self.policy.aggregation {
            if !protocols.contains(&m.as_str()) {
                return Err(format!("policy.aggregation: unknown protocol {m:?} ({})", protocols.join(", ")));
            }
        }
        if self.policy.max_jobs == 0 || self.policy.max_jobs > MAX_JOBS_CEILING {
            return Err(format!("policy.max_jobs: must be in 1..={MAX_JOBS_CEILING} (got {})", self.policy.max_jobs));
        }
        if let Some(e) = self.policy.max_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(format!("policy.max_epsilon: must be positive and finite (got {e})"));
        }
        if self.policy.max_dp_steps_per_round == 0 {
            return Err("policy.max_dp_steps_per_round: must be at least 1".into());
        }
        if let Some(t) = self.policy.min_pipeline_train_secs
            && !(1..=366 * 86_400).contains(&t)
        {
            return Err(format!("policy.min_pipeline_train_secs: must be in [1, 31622400] seconds (got {t})"));
        }
        if let Some(t) = self.policy.min_answer_after_secs
            && !(t > 0.0 && t <= 86_400.0)
        {
            return Err(format!("policy.min_answer_after_secs: must be in (0, 86400] seconds (got {t})"));
        }
        if let Some(d) = self.policy.max_delta
            && !(d > 0.0 && d < 1.0)
        {
            return Err(format!("policy.max_delta: must be in (0, 1) (got {d})"));
        }
        if self.policy.max_delta.is_some() && self.policy.max_epsilon.is_none() && !self.policy.require_dp {
            self.warnings.push(
                "policy.max_delta is set without max_epsilon or require_dp: a job without differential privacy \
                 (ε = ∞, δ = 0) is still accepted"
                    .into(),
            );
        }
        if let Some(f) = self.policy.min_corrupt_fraction
            && !(0.0..1.0 / 3.0).contains(&f)
        {
            return Err(format!(
                "policy.min_corrupt_fraction: must be in [0, 1/3), what secure aggregation can tolerate (got {f})"
            ));
        }
        if let Some(stage) = &self.fault.exit_on_stage {
            let known = plugins.stage_names();
            if !known.contains(&stage.as_str()) {
                return Err(format!("fault.exit_on_stage: unknown stage {stage:?} ({})", known.join(", ")));
            }
        } else if self.fault.exit_on_round.is_some() {
            return Err("fault.exit_on_round: needs fault.exit_on_stage".into());
        }
        Ok(())
    }
}

/// Symbolic links [`resolved_path`] follows in one path, as the kernel's
/// limit (`MAXSYMLINKS`); a path with more resolves no further.
const MAX_LINKS: u32 = 40;

/// `path` as the kernel resolves it, one component at a time: a symbolic
/// link is followed wherever it is, also when what it points to does not
/// exist yet (a watched directory made later, reached through a link made
/// now); `..` is the parent of what the path so far resolved to; a
/// component that does not exist is kept as written. For an existing path
/// this is what `canonicalize` gives.
pub(crate) fn resolved_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    // The components still to walk, the next one last; owned, since a
    // link's target joins them.
    let owned = |p: &Path| -> Vec<(bool, std::ffi::OsString)> {
        p.components().rev().map(|c| (matches!(c, Component::Prefix(_)), c.as_os_str().to_owned())).collect()
    };
    let mut todo = owned(&absolute);
    let mut out = PathBuf::new();
    let mut links = 0;
    while let Some((is_prefix, part)) = todo.pop() {
        match Path::new(&part).components().next() {
            _ if is_prefix => out = PathBuf::from(&part),
            Some(Component::RootDir) => out.push(&part),
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::Normal(name)) => {
                let next = out.join(name);
                let is_link = std::fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_symlink());
                if is_link
                    && links < MAX_LINKS
                    && let Ok(target) = std::fs::read_link(&next)
                {
                    // Relative to the link's directory (`out`); an absolute
                    // target starts again from its root.
                    links += 1;
                    todo.extend(owned(&target));
                    continue;
                }
                out = next;
            }
            _ => {}
        }
    }
    out
}

/// The files a data set reads, as (device, inode): its file, or a watched
/// directory itself and its batches (`DatasetSource::batches`: the
/// `.csv` and `.csv.gz` files directly in it, not hidden; links followed).
/// Two data sets sharing one are over the same rows however their paths
/// are spelt (hard links, bind mounts, a batch that is a link to another
/// data set's file); other files in a directory are not rows and are not
/// compared.
#[cfg(unix)]
fn file_identities(source: &DatasetSource) -> Vec<((u64, u64), PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    let identity = |p: &Path| std::fs::metadata(p).ok().map(|m| ((m.dev(), m.ino()), p.to_owned()));
    let mut ids: Vec<_> = identity(&source.path).into_iter().collect();
    if source.is_watched() {
        ids.extend(source.batches().unwrap_or_default().iter().filter_map(|b| identity(b)));
    }
    ids
}

#[cfg(not(unix))]
fn file_identities(_source: &DatasetSource) -> Vec<((u64, u64), PathBuf)> {
    Vec::new()
}

/// Refuses two data sets over the same rows: one path the same as
/// another's, or a batch of it (a batch-named file directly in a watched
/// directory; other files, and a subdirectory's, are not its rows), as the
/// filesystem resolves them
/// ([`resolved_path`]); or, for what exists, one file reached by both
/// (hard links, bind mounts, a batch linking to another data set's file).
/// The privacy ledger keeps ε per data set name, so two names for the same
/// rows would give them two budgets. Checked at load and again at every
/// job offer (a watched directory's files change while the party runs).
pub(crate) fn overlapping_datasets(datasets: &BTreeMap<String, DatasetSource>) -> Result<(), String> {
    let refused = |a: &str, b: &str, what: String| {
        Err(format!(
            "datasets.{a} and datasets.{b}: {what}; the privacy ledger keeps each data set's ε under its name, so \
             the rows would have two budgets"
        ))
    };
    // A watched directory's batches are the files directly in it with a
    // batch's name (other files are not rows).
    let batch_of = |file: &Path, dir: &Path| {
        file.parent() == Some(dir)
            && file.file_name().is_some_and(|n| confide_algorithms::data::is_batch_name(&n.to_string_lossy()))
    };
    let resolved: Vec<(&String, PathBuf)> = datasets.iter().map(|(name, d)| (name, resolved_path(&d.path))).collect();
    for (i, (a, pa)) in resolved.iter().enumerate() {
        for (b, pb) in &resolved[i + 1..] {
            if pa == pb || batch_of(pa, pb) || batch_of(pb, pa) {
                let what = format!(
                    "{} and {} hold the same rows (one is the other, or a file in it)",
                    pa.display(),
                    pb.display()
                );
                return refused(a, b, what);
            }
        }
    }
    // Every file once, by identity: linear in the batches.
    let mut seen: std::collections::HashMap<(u64, u64), (&String, PathBuf)> = std::collections::HashMap::new();
    for (name, d) in datasets {
        for (id, file) in file_identities(d) {
            let (other, first) = seen.entry(id).or_insert_with(|| (name, file.clone()));
            if *other != name {
                let what = format!("{} and {} are the same file", first.display(), file.display());
                return refused(other, name, what);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(policy: &str) -> Result<PartyConfig, Error> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        let text =
            format!("coordinator = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n{policy}");
        std::fs::write(&path, text).unwrap();
        PartyConfig::load(&path)
    }

    #[test]
    fn the_policy_names_protocols_and_keeps_the_old_name_with_a_warning() {
        let c = load("[policy]\naggregation = [\"secagg\"]\nmax_epsilon = 4.0\nrequire_dp = true\n").unwrap();
        assert_eq!(
            (c.policy.aggregation.as_slice(), c.policy.max_epsilon, c.policy.require_dp),
            (&["secagg".to_string()][..], Some(4.0), true)
        );
        let c = load("[policy]\nprivacy_modes = [\"none\", \"secagg\", \"dp\"]\n").unwrap();
        assert_eq!(c.policy.aggregation, ["none", "secagg"]);
        assert!(c.warnings[0].contains("deprecated") && c.warnings[0].contains("dp ignored"), "{:?}", c.warnings);
        let e = load("[policy]\naggregation = [\"paillier\"]\n").unwrap_err().to_string();
        assert!(e.contains("policy.aggregation: unknown protocol \"paillier\""), "{e}");
        for bad in ["0.0", "-1.0", "1e9", "nan"] {
            let e = load(&format!("[policy]\nmin_answer_after_secs = {bad}\n")).unwrap_err().to_string();
            assert!(e.contains("policy.min_answer_after_secs"), "{bad}: {e}");
        }
        for bad in ["0", "40000000"] {
            let e = load(&format!("[policy]\nmin_pipeline_train_secs = {bad}\n")).unwrap_err().to_string();
            assert!(e.contains("policy.min_pipeline_train_secs"), "{bad}: {e}");
        }
        assert_eq!(
            load("[policy]\nmin_pipeline_train_secs = 86400\n").unwrap().policy.min_pipeline_train_secs,
            Some(86400)
        );
        // Serving counts: on by default, off by default under a DP policy,
        // as set when set.
        for (toml, reports) in [
            ("", true),
            ("[policy]\nmax_epsilon = 4.0\n", false),
            ("[policy]\nrequire_dp = true\n", false),
            ("[serve]\nreport_counts = true\n[policy]\nmax_epsilon = 4.0\n", true),
            ("[serve]\nreport_counts = false\n", false),
        ] {
            assert_eq!(load(toml).unwrap().reports_serving_counts(), reports, "{toml}");
        }
        // Host names for the Host checks: a port or a trailing dot would
        // never match, and is refused naming the field.
        for (toml, field) in [
            ("[metrics]\nallow_hosts = [\"h.internal:9465\"]\n", "metrics.allow_hosts[0]"),
            ("[serve]\nallow_hosts = [\"ok\", \"h.internal.\"]\n", "serve.allow_hosts[1]"),
        ] {
            let e = load(toml).unwrap_err().to_string();
            assert!(e.contains(field), "{toml}: {e}");
        }
        load("[metrics]\nallow_hosts = [\"h.internal\"]\n").unwrap();
        let e = load("[policy]\nmax_epsilon = -1.0\n").unwrap_err().to_string();
        assert!(e.contains("policy.max_epsilon"), "{e}");
        for bad in ["0.0", "1.0", "nan"] {
            let e = load(&format!("[policy]\nmax_delta = {bad}\n")).unwrap_err().to_string();
            assert!(e.contains("policy.max_delta: must be in (0, 1)"), "{e}");
        }
        let c = load("[policy]\nmax_delta = 1e-4\n").unwrap();
        assert_eq!(c.policy.max_delta, Some(1e-4));
        assert!(c.warnings.iter().any(|w| w.contains("still accepted")), "{:?}", c.warnings);
        assert!(load("[policy]\nmax_delta = 1e-4\nmax_epsilon = 8.0\n").unwrap().warnings.is_empty());
        // he under a floor of corrupt parties can never be accepted: a warning at start.
        let c = load("[policy]\naggregation = [\"secagg\", \"he\"]\nmin_corrupt_fraction = 0.1\n").unwrap();
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("refuses every he job"), "{:?}", c.warnings);
        let e = load("[policy]\nmin_corrupt_fraction = 0.5\n").unwrap_err().to_string();
        assert!(e.contains("policy.min_corrupt_fraction") && e.contains("1/3"), "{e}");
        assert_eq!(load("[policy]\nmin_corrupt_fraction = 0.1\n").unwrap().policy.min_corrupt_fraction, Some(0.1));
        let e = load("[fault]\nexit_on_stage = \"secagg-unmask\"\n").map(|c| c.fault.exit_on_stage);
        assert_eq!(e.unwrap().as_deref(), Some("secagg-unmask"));
        assert!(load("[fault]\nexit_on_stage = \"secagg-nope\"\n").is_err());
        let e = load("[fault]\nexit_on_round = 1\n").unwrap_err().to_string();
        assert!(e.contains("fault.exit_on_round"), "{e}");
        let c = load("[serve]\nservices = [\"triage\"]\nlisten = \"127.0.0.1:8080\"\n").unwrap();
        assert_eq!(c.serve.services, ["triage"]);
        assert!(c.serve_dir().ends_with("k.serve"));
        let e = load("[serve]\nservices = [\"a b\"]\n").unwrap_err().to_string();
        assert!(e.contains("serve.services[0]"), "{e}");
        let e = load("[serve]\nservices = [\"a\", \"a\"]\n").unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = load("[serve]\nlisten = \"127.0.0.1:8080\"\n").unwrap_err().to_string();
        assert!(e.contains("serve.listen"), "{e}");
        let e = load("[serve]\nservices = [\"a\"]\nmax_rows = 0\n").unwrap_err().to_string();
        assert!(e.contains("serve.max_rows"), "{e}");
        let c = load("[policy.share_inputs]\ndigits = [\"cloud-0\"]\n").unwrap();
        assert!(c.policy.may_share_inputs("digits", "cloud-0"));
        assert!(!c.policy.may_share_inputs("digits", "cloud-1") && !c.policy.may_share_inputs("triage", "cloud-0"));
        assert!(c.audit_log_path().ends_with("k.audit.jsonl"));
        let e = load("[cloud]\nservices = [\"x\"]\n").unwrap_err().to_string();
        assert!(e.contains("cloud.services[0]"), "{e}");
        let e = load("[policy.share_inputs]\ndigits = [\"bad name\"]\n").unwrap_err().to_string();
        assert!(e.contains("policy.share_inputs.digits[0]"), "{e}");
        // Labelled rows' data set: a served service, a configured data set.
        let served = "[datasets.d]\npath = \"d\"\n[serve]\nservices = [\"a\"]\n";
        let c = load(&format!("{served}[serve.labelled_rows_dataset]\na = \"d\"\n")).unwrap();
        assert_eq!(c.serve.labelled_rows_dataset.get("a").map(String::as_str), Some("d"));
        let c = load(&format!("{served}[serve.labelled_rows_dataset]\nb = \"d\"\n")).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("serve.labelled_rows_dataset.b")), "{:?}", c.warnings);
        let e = load(&format!("{served}[serve.labelled_rows_dataset]\n\"b c\" = \"d\"\n")).unwrap_err().to_string();
        assert!(e.contains("serve.labelled_rows_dataset.b c"), "{e}");
        let e = load(&format!("{served}[serve.labelled_rows_dataset]\na = \"x\"\n")).unwrap_err().to_string();
        assert!(e.contains("serve.labelled_rows_dataset.a") && e.contains("\"x\""), "{e}");
    }

    /// A data set's declared width (what a DP job takes rows of) is read
    /// beside the CSV layout and checked, naming the data set.
    #[test]
    fn a_data_sets_declared_width_is_read_and_checked() {
        let c = load("[datasets.bc]\npath = \"bc.csv\"\nheader = true\nfeatures = 30\n").unwrap();
        assert_eq!((c.datasets["bc"].features, c.datasets["bc"].csv.header), (Some(30), true));
        let e = load("[datasets.bc]\npath = \"bc.csv\"\nfeatures = 0\n").unwrap_err().to_string();
        assert!(e.contains("datasets.bc.features"), "{e}");
        assert!(load("[datasets.bc]\npath = \"bc.csv\"\nfeature = 30\n").is_err(), "a misspelt key is refused");
    }

    /// The reconnection back-off has a ceiling (past it, doubling with
    /// jitter would overflow), named in the error.
    #[test]
    fn the_reconnection_delay_has_a_ceiling() {
        assert!(load("[reconnect]\ninitial_ms = 100\nmax_ms = 86400000\n").is_ok());
        let e = load("[reconnect]\ninitial_ms = 100\nmax_ms = 9223372036854775808\n").unwrap_err().to_string();
        assert!(e.contains("reconnect.max_ms") && e.contains("at most 86400000"), "{e}");
    }

    /// Two names for the same rows would give them two privacy budgets:
    /// the same file, a file inside a watched directory, or a path that
    /// reaches the same file another way, is refused, naming both.
    #[test]
    fn two_data_sets_over_the_same_rows_are_refused() {
        for (second, why) in [
            ("bc.csv", "the same file"),
            ("./sub/../bc.csv", "the same file another way"),
            ("watched/001.csv", "a file in a watched directory"),
        ] {
            let text = format!(
                "[datasets.bc]\npath = \"bc.csv\"\n[datasets.w]\npath = \"watched\"\n[datasets.again]\npath = \"{second}\"\n"
            );
            let e = load(&text).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("datasets.") && e.contains("two") && e.contains("budgets"), "{why}: {e}");
        }
        let c = load("[datasets.bc]\npath = \"bc.csv\"\n[datasets.digits]\npath = \"digits.csv\"\n").unwrap();
        assert_eq!(c.datasets.len(), 2, "distinct files are two data sets");
        let nested = "[datasets.w]\npath = \"watched\"\n[datasets.old]\npath = \"watched/archive/old.csv\"\n";
        assert_eq!(load(nested).unwrap().datasets.len(), 2, "a subdirectory's file is not a batch of the directory");
        // A file not there yet, under a symbolic link to a watched directory.
        #[cfg(unix)]
        {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir(dir.path().join("watched")).unwrap();
            std::os::unix::fs::symlink(dir.path().join("watched"), dir.path().join("alias")).unwrap();
            let path = dir.path().join("p.toml");
            let text = "coordinator = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                        [datasets.w]\npath = \"watched\"\n[datasets.later]\npath = \"alias/002.csv\"\n";
            std::fs::write(&path, text).unwrap();
            let e = PartyConfig::load(&path).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("two") && e.contains("budgets"), "through a symbolic link: {e}");
            // `..` after a symbolic link is the parent of its target: here
            // the watched directory's own parent, so `alias/../watched/x.csv`
            // is a batch of it.
            std::fs::create_dir(dir.path().join("elsewhere")).unwrap();
            std::os::unix::fs::symlink(dir.path().join("watched"), dir.path().join("elsewhere/in")).unwrap();
            let text = "coordinator = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
                        [datasets.w]\npath = \"watched\"\n[datasets.up]\npath = \"elsewhere/in/../watched/x.csv\"\n";
            std::fs::write(&path, text).unwrap();
            let e = PartyConfig::load(&path).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("budgets"), "`..` after a symbolic link: {e}");
            let refused = |datasets: &str| {
                let text = format!(
                    "coordinator = \"https://x:1\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n{datasets}"
                );
                std::fs::write(&path, text).unwrap();
                PartyConfig::load(&path).map(|_| ()).err().map(|e| e.to_string())
            };
            // A link to a directory not made yet: the two names are one
            // directory once it is made.
            std::os::unix::fs::symlink(dir.path().join("icu"), dir.path().join("icu-link")).unwrap();
            let e = refused("[datasets.a]\npath = \"icu\"\n[datasets.b]\npath = \"icu-link\"\n");
            assert!(e.is_some_and(|e| e.contains("budgets")), "through a dangling link");
            let e = refused("[datasets.a]\npath = \"icu\"\n[datasets.b]\npath = \"icu-link/002.csv\"\n");
            assert!(e.is_some_and(|e| e.contains("budgets")), "a file under a dangling link");
            // A hard link, and a batch that links to another data set's file.
            std::fs::write(dir.path().join("bc.csv"), "1,0\n").unwrap();
            std::fs::hard_link(dir.path().join("bc.csv"), dir.path().join("copy.csv")).unwrap();
            let e = refused("[datasets.a]\npath = \"bc.csv\"\n[datasets.b]\npath = \"copy.csv\"\n");
            assert!(e.is_some_and(|e| e.contains("same file")), "a hard link");
            std::os::unix::fs::symlink(dir.path().join("bc.csv"), dir.path().join("watched/link.csv")).unwrap();
            let e = refused("[datasets.a]\npath = \"bc.csv\"\n[datasets.w]\npath = \"watched\"\n");
            assert!(e.is_some_and(|e| e.contains("same file")), "a batch linking to another data set's file");
            // Other files in watched directories are not rows: two
            // directories sharing a (hard-linked) README are two data sets.
            std::fs::create_dir(dir.path().join("other")).unwrap();
            std::fs::write(dir.path().join("watched/README.txt"), "about").unwrap();
            std::fs::hard_link(dir.path().join("watched/README.txt"), dir.path().join("other/README.txt")).unwrap();
            std::fs::remove_file(dir.path().join("watched/link.csv")).unwrap();
            let e = refused("[datasets.w]\npath = \"watched\"\n[datasets.o]\npath = \"other\"\n");
            assert_eq!(e, None, "a shared file that is no batch");
            // Nor is a file of another kind, or a subdirectory, a batch.
            for inside in ["watched/notes.txt", "watched/sub", "watched/.002.csv.tmp"] {
                let e = refused(&format!("[datasets.w]\npath = \"watched\"\n[datasets.x]\npath = \"{inside}\"\n"));
                assert_eq!(e, None, "{inside}");
            }
            // A loop of links resolves no further, and is not a panic.
            std::os::unix::fs::symlink(dir.path().join("loop-b"), dir.path().join("loop-a")).unwrap();
            std::os::unix::fs::symlink(dir.path().join("loop-a"), dir.path().join("loop-b")).unwrap();
            assert_eq!(refused("[datasets.a]\npath = \"loop-a/x.csv\"\n[datasets.b]\npath = \"bc.csv\"\n"), None);
        }
    }

    /// For an existing path, the resolution is the kernel's (`canonicalize`).
    #[cfg(unix)]
    #[test]
    fn an_existing_path_resolves_as_canonicalize_does() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/f.csv"), "").unwrap();
        std::os::unix::fs::symlink("b/c", root.join("a/rel")).unwrap();
        std::os::unix::fs::symlink(root.join("a/b"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../rel", root.join("abs/up")).unwrap();
        for p in ["a/rel/f.csv", "abs/c/./f.csv", "abs/up/f.csv", "abs/up/../c/f.csv", "a/rel/../../rel/f.csv"] {
            let path = root.join(p);
            assert_eq!(resolved_path(&path), std::fs::canonicalize(&path).unwrap(), "{p}");
        }
    }
}
