//! Serving deployed models to the hospital's own applications.
//!
//! A party serves the services its `[serve] services` lists, and only
//! models an administrator deployed: a deployment arrives over the
//! coordinator stream as a signed record ([`SignedDeployment`]), which this
//! module verifies against the federation CA (an admin certificate, not
//! revoked) before pulling the model. The model's bytes must have the
//! signed SHA-256 and its tensors the signed architecture; each service's
//! sequence only grows, so the coordinator cannot replay an older
//! deployment. Verified deployments are kept in `[serve] dir` and served
//! again after a restart, before the coordinator is reachable.
//!
//! Each service has one worker thread that owns its model (libtorch models
//! are `Send`, not `Sync`) and answers queued requests in batches: requests
//! that arrive while a batch runs are answered together by the next one.
//! A new version is swapped in between two batches, so no request in
//! flight fails or sees half a model.

pub mod http;
pub mod joint;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, RwLock};

use confide_algorithms::{Parameters, Trainer};
use confide_crypto::identity::SharedRevocations;
use confide_proto::deploy::SignedDeployment;
use confide_proto::pb;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::{PartyConfig, ServeConfig};
use crate::trainers::BuiltinTrainers;

/// A model version a service answers with, and what it takes.
#[derive(Debug)]
pub struct Served {
    /// The verified deployment.
    pub deployment: SignedDeployment,
    /// Features per row.
    pub width: usize,
}

impl Served {
    /// Classes: probabilities per row.
    pub fn classes(&self) -> usize {
        self.deployment.model.classes
    }
}

/// One request's answer.
#[derive(Debug)]
pub struct Prediction {
    /// Row-major class probabilities, `rows × classes`.
    pub probabilities: Vec<f32>,
    /// The version that answered.
    pub served: Arc<Served>,
}

/// Why a prediction could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The service is not in `[serve] services`.
    #[error("service {0:?} is not served here (see [serve] services)")]
    UnknownService(String),
    /// No version has been deployed to (or verified for) the service yet.
    #[error("service {0} has no deployed model yet")]
    NotReady(String),
    /// A row's width is not the model's.
    #[error("{what}: {got} values, but service {service}'s model takes {expected}")]
    WrongWidth {
        /// The service.
        service: String,
        /// Which row.
        what: String,
        /// Its width.
        got: usize,
        /// The model's.
        expected: usize,
    },
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The request has more rows (or bytes) than this party takes.
    #[error("{0}")]
    TooLarge(String),
    /// The model failed.
    #[error("prediction failed: {0}")]
    Failed(String),
}

struct PredictJob {
    rows: Vec<f32>,
    count: usize,
    width: usize,
    reply: tokio::sync::oneshot::Sender<Result<Prediction, ServeError>>,
}

enum WorkerMsg {
    Predict(PredictJob),
    Swap(Box<dyn Trainer>, Arc<Served>),
}

/// One served service: its worker's queue and the version it answers with.
struct Service {
    name: String,
    current: RwLock<Option<Arc<Served>>>,
    worker: Mutex<Sender<WorkerMsg>>,
    /// Held while a deployment is checked, kept and swapped in: two
    /// installs at once could leave the store and the served version at
    /// the older one (and its newer model file removed).
    installing: Mutex<()>,
}

impl Service {
    fn current(&self) -> Option<Arc<Served>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Installs of pulled models: one at a time per service, and of those
/// pulled meanwhile only the newest waits, so that a coordinator sending
/// deployments faster than they install holds at most a pull, an install
/// and one waiting model per service here.
#[derive(Default)]
struct Installs {
    waiting: HashMap<String, (SignedDeployment, Vec<u8>)>,
    running: std::collections::HashSet<String>,
}

/// A model being pulled.
struct Pull {
    deployment: SignedDeployment,
    bytes: Vec<u8>,
    /// The size the first part announced: every later part must announce
    /// the same (one raising it could make the party hold more than it
    /// reserved for; found by review).
    total: Option<usize>,
}

/// The deployed models of the services this party serves.
pub struct Registry {
    services: BTreeMap<String, Arc<Service>>,
    store: PathBuf,
    ca_pem: Vec<u8>,
    revocations: SharedRevocations,
    builder: BuiltinTrainers,
    config: ServeConfig,
    max_model_bytes: usize,
    pulls: Mutex<HashMap<String, Pull>>,
    /// Pulled models waiting for their service's install, and the services
    /// whose install runs (see [`Registry::queue_install`]).
    installs: Mutex<Installs>,
    /// This party's name, from the coordinator's welcome.
    me: RwLock<String>,
    /// The current coordinator stream, for forwarded requests.
    uplink: Mutex<Option<tokio::sync::mpsc::Sender<pb::PartyMessage>>>,
    joint: joint::Joint,
    /// Where hard examples are kept for labelling (incremental pipelines).
    hard_examples: std::sync::OnceLock<Arc<crate::watch::Watches>>,
    /// The node's metrics, once it counts requests.
    metrics: std::sync::OnceLock<crate::telemetry::SharedMetrics>,
    /// Requests and rows by source per service since the node started,
    /// for the serving report to the coordinator.
    tally: Mutex<BTreeMap<String, pb::ServiceRows>>,
}

/// Where a row's answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowSource {
    /// The edge model, sure enough.
    Edge,
    /// The cloud model (a hard example, forwarded).
    Cloud,
    /// The edge model, though the row is hard (not forwarded: see the answer's fallback).
    EdgeHard,
}

impl RowSource {
    /// The name in answers.
    pub fn as_str(self) -> &'static str {
        match self {
            RowSource::Edge | RowSource::EdgeHard => "edge",
            RowSource::Cloud => "cloud",
        }
    }
}

/// An answer to a request, with where each row's answer came from.
#[derive(Debug)]
pub struct Answer {
    /// Row-major class probabilities.
    pub probabilities: Vec<f32>,
    /// The edge version.
    pub served: Arc<Served>,
    /// Per row.
    pub sources: Vec<RowSource>,
    /// The cloud version that answered the forwarded rows.
    pub cloud: Option<joint::CloudVersion>,
    /// Why hard rows were answered at the edge.
    pub fallback: Option<String>,
}

/// What a deployment kept in the store looks like on disk.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredDeployment {
    /// The signed record (JSON, as signed).
    record: String,
    /// Hex.
    signature: String,
    /// Hex, DER.
    admin_certificate: String,
    /// A pipeline's deployment: the administrator's grant, hex of the
    /// encoded `SignedGrant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grant: Option<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16).map_err(|e| e.to_string()))
        .collect()
}

/// SHA-256 of `bytes`, lowercase hex (a model version's digest).
pub fn sha256_hex(bytes: &[u8]) -> String {
    confide_proto::deploy::model_sha256(bytes)
}

/// The newest deployment a service has taken here (`high-water.json` in its
/// directory): its sequence and the SHA-256 of its signed record. Kept
/// apart from the deployment served, and never lowered, so that a kept
/// deployment that no longer loads (its signer revoked since, its model
/// file lost) does not let the coordinator replay an older one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HighWater {
    sequence: u64,
    record_sha256: String,
    /// The newest deployment an administrator signed (not a pipeline under
    /// a grant) taken here: a grant signed before it no longer holds.
    #[serde(default)]
    admin_sequence: u64,
}

impl HighWater {
    /// The mark after taking `d`, from the mark before (if any).
    fn after(before: Option<&HighWater>, d: &SignedDeployment) -> HighWater {
        let admin = if d.grant.is_none() { d.record.sequence } else { 0 };
        HighWater {
            sequence: d.record.sequence,
            record_sha256: sha256_hex(&d.bytes),
            admin_sequence: before.map_or(0, |b| b.admin_sequence).max(admin),
        }
    }
}

/// The largest sequence a pipeline's deployment may carry: the coordinator
/// signs those, and one near `u64::MAX` would leave the administrator no
/// sequence above it (an administrator's deployment may go past it).
pub const MAX_PIPELINE_SEQUENCE: u64 = 1 << 40;

/// The most characters of a peer's or the coordinator's words an answer's
/// `fallback` (or a log line) carries.
pub const MAX_FALLBACK_CHARS: usize = 512;

/// A pipeline's deployment is taken only before its grant's expiry, by
/// this party's clock, whatever the record says.
fn grant_unexpired(d: &SignedDeployment) -> Result<(), String> {
    if let Some(g) = &d.grant {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if now > g.grant.expires_at {
            return Err(format!(
                "the coordinator sent a pipeline's deployment {} of service {} under a grant that expired at {}",
                d.record.sequence, d.record.service, g.grant.expires_at
            ));
        }
    }
    Ok(())
}

impl Registry {
    /// The registry of `config`'s `[serve]` table, with each service's
    /// kept deployment loaded (and verified again); `None` when the party
    /// serves nothing. `revocations` is the node's list in force.
    pub fn open(config: &PartyConfig, revocations: SharedRevocations) -> Result<Option<Arc<Registry>>, String> {
        let serve = &config.serve;
        if serve.services.is_empty() {
            return Ok(None);
        }
        let ca_pem = std::fs::read(&config.ca).map_err(|e| format!("{}: {e}", config.ca.display()))?;
        let store = config.serve_dir();
        confide_proto::durable::create_dirs(&store, &mut |_| {}).map_err(|e| format!("serve.dir: {e}"))?;
        let mut services = BTreeMap::new();
        for name in &serve.services {
            let (tx, rx) = std::sync::mpsc::channel();
            let (max_batch, service) = (serve.max_batch_rows, name.clone());
            std::thread::Builder::new()
                .name(format!("serve-{name}"))
                .spawn(move || worker(&service, rx, max_batch))
                .map_err(|e| format!("starting the worker of service {name}: {e}"))?;
            let svc = Service {
                name: name.clone(),
                current: RwLock::new(None),
                worker: Mutex::new(tx),
                installing: Mutex::new(()),
            };
            services.insert(name.clone(), Arc::new(svc));
        }
        let joint = joint::Joint::open(config, &store, ca_pem.clone(), revocations.clone())?;
        let registry = Registry {
            services,
            store,
            me: RwLock::new(String::new()),
            uplink: Mutex::new(None),
            joint,
            hard_examples: std::sync::OnceLock::new(),
            metrics: std::sync::OnceLock::new(),
            tally: Mutex::new(BTreeMap::new()),
            ca_pem,
            revocations,
            builder: BuiltinTrainers::for_config(config),
            config: serve.clone(),
            max_model_bytes: config.limits.max_values.saturating_mul(4).saturating_add(1 << 20),
            pulls: Mutex::new(HashMap::new()),
            installs: Mutex::new(Installs::default()),
        };
        for name in &serve.services {
            match registry.load_kept(name) {
                Ok(Some(seq)) => info!(service = %name, sequence = seq, "serving the kept deployment"),
                Ok(None) => {}
                Err(e) => warn!(service = %name, "the kept deployment is not served: {e}"),
            }
        }
        Ok(Some(Arc::new(registry)))
    }

    /// The `[serve]` settings.
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// The services served, with the version each answers with.
    pub fn services(&self) -> Vec<(String, Option<Arc<Served>>)> {
        self.services.values().map(|s| (s.name.clone(), s.current())).collect()
    }

    /// The version `service` answers with.
    pub fn current(&self, service: &str) -> Result<Arc<Served>, ServeError> {
        let svc = self.services.get(service).ok_or_else(|| ServeError::UnknownService(service.to_owned()))?;
        svc.current().ok_or_else(|| ServeError::NotReady(service.to_owned()))
    }

    fn dir(&self, service: &str) -> PathBuf {
        self.store.join(service)
    }

    /// A deployment at least as new as `serve.min_sequence` names for its
    /// service: the floor of a party with no record of its own.
    fn at_least_configured(&self, d: &SignedDeployment) -> Result<(), String> {
        let r = &d.record;
        match self.config.min_sequence.get(&r.service) {
            Some(&min) if r.sequence < min => Err(format!(
                "the coordinator sent deployment {} of service {}, older than serve.min_sequence.{} = {min}",
                r.sequence, r.service, r.service
            )),
            _ => Ok(()),
        }
    }

    /// `service`'s [`HighWater`]; an unreadable one is an error (no
    /// deployment is taken until the hospital looks at it).
    fn high_water(&self, service: &str) -> Result<Option<HighWater>, String> {
        let path = self.dir(service).join("high-water.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                format!("{}: {e} (this party takes no deployment of {service} until it is fixed)", path.display())
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Loads `service`'s kept deployment, verified as if it had just arrived.
    fn load_kept(&self, service: &str) -> Result<Option<u64>, String> {
        let dir = self.dir(service);
        let path = dir.join("deployment.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let kept: StoredDeployment = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let msg = pb::ServiceDeployment {
            record: kept.record.into_bytes(),
            signature: unhex(&kept.signature).map_err(|e| format!("{}: signature: {e}", path.display()))?,
            admin_certificate: unhex(&kept.admin_certificate)
                .map_err(|e| format!("{}: admin_certificate: {e}", path.display()))?,
            grant: kept
                .grant
                .map(|g| {
                    let bytes = unhex(&g)?;
                    <pb::SignedGrant as prost::Message>::decode(bytes.as_slice()).map_err(|e| e.to_string())
                })
                .transpose()
                .map_err(|e| format!("{}: grant: {e}", path.display()))?,
        };
        let d = self.verify(&msg).map_err(|e| format!("{}: {e}", path.display()))?;
        if d.record.service != service {
            return Err(format!("{}: a deployment of service {}", path.display(), d.record.service));
        }
        // A store kept before the high-water mark existed gets one from its
        // deployment, once it verifies (an edited file sets no mark), before
        // its model is read (a lost model file must not lose the mark too).
        if self.high_water(service)?.is_none() {
            let high = HighWater::after(None, &d);
            let bytes = serde_json::to_vec(&high).map_err(|e| e.to_string())?;
            confide_proto::durable::write_file(&dir.join("high-water.json"), &bytes)?;
        }
        let model = dir.join(format!("model-{}.safetensors", d.record.sha256));
        let bytes = std::fs::read(&model).map_err(|e| format!("{}: {e}", model.display()))?;
        let seq = d.record.sequence;
        self.install(d, &bytes, false)?;
        Ok(Some(seq))
    }

    fn verify(&self, msg: &pb::ServiceDeployment) -> Result<SignedDeployment, String> {
        let list = self.revocations.read().unwrap_or_else(|p| p.into_inner()).clone();
        SignedDeployment::verify(msg, &self.ca_pem, &list).map_err(|e| e.to_string())
    }

    /// Keeps the hard examples of services with a cloud tier in `watches`
    /// for the hospital to label (see [`crate::watch`]).
    pub fn keep_hard_examples_in(&self, watches: Arc<crate::watch::Watches>) {
        let _ = self.hard_examples.set(watches);
    }

    /// A deployment from the coordinator: verified, and if it is for a
    /// service served here and newer than the one served, the pull to send.
    /// An error is a coordinator fault (forged, replayed or conflicting).
    pub fn offer(&self, msg: &pb::ServiceDeployment) -> Result<Option<pb::ModelPull>, String> {
        let d = self.verify(msg).map_err(|e| format!("the coordinator relayed a deployment that fails: {e}"))?;
        let r = &d.record;
        let Some(svc) = self.services.get(&r.service) else { return Ok(None) };
        // A pipeline's grant ends: a new deployment under it is refused
        // after its expiry by this party's clock, whatever the record says.
        grant_unexpired(&d)?;
        let held = svc.current();
        let held_seq = held.as_ref().map_or(0, |h| h.deployment.record.sequence);
        let high = self.high_water(&r.service)?;
        // A grant signed before an administrator's deployment taken here
        // does not undo it (another model or cloud tier put back).
        self.grant_holds(&d, held.as_deref(), high.as_ref())?;
        self.at_least_configured(&d)?;
        let floor = held_seq.max(high.as_ref().map_or(0, |h| h.sequence));
        if r.sequence < floor {
            return Err(format!(
                "the coordinator sent deployment {} of service {}, older than the {floor} taken here (a replay)",
                r.sequence, r.service
            ));
        }
        if r.sequence == floor && floor > 0 {
            let taken_again =
                high.as_ref().is_some_and(|h| h.sequence == floor && h.record_sha256 == sha256_hex(&d.bytes));
            match &held {
                Some(h) if h.deployment.record.sequence == floor && h.deployment.bytes == d.bytes => return Ok(None),
                // The one taken before, not served now (its kept copy did
                // not load): taken again.
                None if taken_again => {}
                Some(h) if h.deployment.record.sequence < floor && taken_again => {}
                _ => {
                    return Err(format!(
                        "the coordinator sent another deployment {} of service {} than the one taken here",
                        r.sequence, r.service
                    ));
                }
            }
        }
        if d.grant.is_some() && r.sequence > MAX_PIPELINE_SEQUENCE {
            return Err(format!(
                "the coordinator sent a pipeline's deployment {} of service {}, past the largest a pipeline may \
                 use ({MAX_PIPELINE_SEQUENCE})",
                r.sequence, r.service
            ));
        }
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        if pulls.get(&r.service).is_some_and(|p| p.deployment.record.sequence >= r.sequence) {
            return Ok(None);
        }
        let pull = pb::ModelPull { service: r.service.clone(), sequence: r.sequence };
        info!(service = %r.service, sequence = r.sequence, job = %r.job_id, round = r.round, "pulling a deployed model");
        pulls.insert(r.service.clone(), Pull { deployment: d, bytes: Vec::new(), total: None });
        Ok(Some(pull))
    }

    /// Refuses a pipeline's deployment `d` under a grant signed before an
    /// administrator's deployment taken here (`held` served, `high` the
    /// mark): it would undo it (another model or cloud tier put back).
    fn grant_holds(&self, d: &SignedDeployment, held: Option<&Served>, high: Option<&HighWater>) -> Result<(), String> {
        let Some(g) = &d.grant else { return Ok(()) };
        let held_admin = held.filter(|h| h.deployment.grant.is_none()).map_or(0, |h| h.deployment.record.sequence);
        let admin = high.map_or(0, |h| h.admin_sequence).max(held_admin);
        if g.grant.superseded_by(admin) {
            return Err(format!(
                "the coordinator sent a pipeline's deployment {} of service {} under a grant signed after \
                 deployment {}, before the administrator's deployment {admin} taken here",
                d.record.sequence, d.record.service, g.grant.after_sequence
            ));
        }
        Ok(())
    }

    /// A part of a pulled model; the deployment and its bytes once complete.
    /// An error ends the pull (a coordinator fault or its refusal).
    pub fn on_part(&self, part: pb::ModelPart) -> Result<Option<(SignedDeployment, Vec<u8>)>, String> {
        let mut pulls = self.pulls.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pull) = pulls.get_mut(&part.service) else {
            return Err(format!(
                "the coordinator sent a model part of service {:?}, which was not pulled",
                part.service
            ));
        };
        let fail = |pulls: &mut HashMap<String, Pull>, why: String| {
            pulls.remove(&part.service);
            Err(why)
        };
        if pull.deployment.record.sequence != part.sequence {
            return Ok(None); // a part of a pull this one superseded
        }
        if !part.error.is_empty() {
            let error: String = part.error.chars().take(MAX_FALLBACK_CHARS).collect();
            let why = format!("the coordinator could not send the model of service {}: {error}", part.service);
            return fail(&mut pulls, why);
        }
        let total = usize::try_from(part.total_bytes).unwrap_or(usize::MAX);
        if total > self.max_model_bytes {
            let why = format!("a model of {total} bytes exceeds this party's limit of {}", self.max_model_bytes);
            return fail(&mut pulls, why);
        }
        if *pull.total.get_or_insert(total) != total {
            let why = format!("the model parts of service {} announce different sizes", part.service);
            return fail(&mut pulls, why);
        }
        if part.offset != pull.bytes.len() as u64 || pull.bytes.len() + part.data.len() > total {
            return fail(&mut pulls, format!("the model parts of service {} are out of order", part.service));
        }
        if pull.bytes.is_empty() {
            // Once, to the model's size (bounded above): no doubling past it.
            pull.bytes.reserve_exact(total);
        }
        pull.bytes.extend_from_slice(&part.data);
        if pull.bytes.len() < total {
            return Ok(None);
        }
        let Some(done) = pulls.remove(&part.service) else { return Ok(None) };
        Ok(Some((done.deployment, done.bytes)))
    }

    /// Takes a pulled model for install. True when the caller must run
    /// [`Registry::run_installs`] for its service (no install of it runs);
    /// otherwise the running one takes it up, unless a newer one comes
    /// first.
    pub fn queue_install(&self, d: SignedDeployment, bytes: Vec<u8>) -> bool {
        let mut installs = self.installs.lock().unwrap_or_else(|p| p.into_inner());
        let service = d.record.service.clone();
        let newer = installs.waiting.get(&service).is_none_or(|(w, _)| w.record.sequence < d.record.sequence);
        if newer {
            installs.waiting.insert(service.clone(), (d, bytes));
        }
        installs.running.insert(service)
    }

    /// Installs the models queued for `service`, one at a time, until none
    /// waits. Blocking.
    pub fn run_installs(&self, service: &str) {
        /// A panic in an install ends the run: the next pull starts another.
        struct EndsOnPanic<'a>(&'a Registry, &'a str);
        impl Drop for EndsOnPanic<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.installs.lock().unwrap_or_else(|p| p.into_inner()).running.remove(self.1);
                }
            }
        }
        let _ends = EndsOnPanic(self, service);
        loop {
            let next = {
                let mut installs = self.installs.lock().unwrap_or_else(|p| p.into_inner());
                match installs.waiting.remove(service) {
                    Some(next) => next,
                    None => {
                        installs.running.remove(service);
                        return;
                    }
                }
            };
            let (d, bytes) = next;
            if let Err(e) = self.install(d, &bytes, true) {
                warn!("deployment refused: {e}");
            }
        }
    }

    /// Checks a pulled model against its deployment (hash, architecture),
    /// keeps both in the store when `keep`, and swaps it in. Blocking: it
    /// hashes, parses and builds the model.
    pub fn install(&self, d: SignedDeployment, bytes: &[u8], keep: bool) -> Result<(), String> {
        let r = &d.record;
        let svc = self.services.get(&r.service).ok_or_else(|| format!("service {} is not served here", r.service))?;
        // Held for the whole install: whatever runs installs, two never
        // pass the sequence check below together.
        let _installing = svc.installing.lock().unwrap_or_else(|p| p.into_inner());
        // Again here: an administrator's deployment installed since the
        // offer (pulled meanwhile) ends the grant too; so does its expiry,
        // which a coordinator could otherwise pass by holding the model's
        // parts back until after it (found by review). (A deployment read
        // back from this party's own disk at a restart was taken in time.)
        self.grant_holds(&d, svc.current().as_deref(), self.high_water(&r.service)?.as_ref())?;
        if keep {
            grant_unexpired(&d)?;
            self.at_least_configured(&d)?;
        }
        if let Some(held) = svc.current() {
            let seq = held.deployment.record.sequence;
            if r.sequence < seq {
                return Err(format!("deployment {} of service {} arrived after a newer one", r.sequence, r.service));
            }
            if r.sequence == seq {
                if held.deployment.bytes == d.bytes {
                    return Ok(());
                }
                return Err(format!(
                    "another deployment {} of service {} than the one served here (two records of one sequence)",
                    r.sequence, r.service
                ));
            }
        }
        let sha = sha256_hex(bytes);
        if sha != r.sha256 {
            return Err(format!(
                "the model of deployment {} of service {} has SHA-256 {sha}, not the signed {}",
                r.sequence, r.service, r.sha256
            ));
        }
        let params = Parameters::from_safetensors(bytes).map_err(|e| format!("the deployed model: {e}"))?;
        let model = self.builder.inference_model(&d.model, &params).map_err(|e| {
            format!(
                "the model of deployment {} of service {} is not its signed architecture: {e}",
                r.sequence, r.service
            )
        })?;
        let width = params.get(confide_algorithms::trainer::INPUT_MEAN).map_or(0, |t| t.data.len());
        if keep {
            self.keep(&d, bytes)?;
        }
        let served = Arc::new(Served { width, deployment: d });
        let swap = WorkerMsg::Swap(model, served.clone());
        // `current` first: a request that reads it (whether to keep its
        // rows for a cloud tier) then never runs on a newer worker model
        // than it read. The other way round is handled in `answer_rows`.
        let before = svc.current.write().unwrap_or_else(|p| p.into_inner()).replace(served.clone());
        if svc.worker.lock().unwrap_or_else(|p| p.into_inner()).send(swap).is_err() {
            *svc.current.write().unwrap_or_else(|p| p.into_inner()) = before;
            return Err(format!("the worker of service {} has stopped", svc.name));
        }
        let r = &served.deployment.record;
        info!(service = %r.service, sequence = r.sequence, job = %r.job_id, round = r.round, action = r.action.as_str(), "now serving");
        Ok(())
    }

    /// Writes the model, then the deployment naming it, then removes older
    /// models: a crash leaves the previous deployment and its model intact.
    fn keep(&self, d: &SignedDeployment, bytes: &[u8]) -> Result<(), String> {
        let dir = self.dir(&d.record.service);
        // Its entry in the store synced too: a lost directory would take the
        // high-water mark with it.
        confide_proto::durable::create_dirs(&dir, &mut |_| {})?;
        let model_name = format!("model-{}.safetensors", d.record.sha256);
        confide_proto::durable::write_file(&dir.join(&model_name), bytes)?;
        let kept = StoredDeployment {
            record: String::from_utf8(d.bytes.clone()).map_err(|e| format!("deployment record: {e}"))?,
            signature: hex(&d.signature),
            admin_certificate: hex(&d.admin_certificate),
            grant: d.grant.as_ref().map(|g| hex(&prost::Message::encode_to_vec(&g.to_pb()))),
        };
        let json = serde_json::to_vec_pretty(&kept).map_err(|e| e.to_string())?;
        // The high-water mark first, and never lowered.
        let before = self.high_water(&d.record.service)?;
        if before.as_ref().is_none_or(|h| h.sequence < d.record.sequence) {
            let high = HighWater::after(before.as_ref(), d);
            let bytes = serde_json::to_vec(&high).map_err(|e| e.to_string())?;
            confide_proto::durable::write_file(&dir.join("high-water.json"), &bytes)?;
        }
        confide_proto::durable::write_file(&dir.join("deployment.json"), &json)?;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("model-") && name != model_name {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// A new coordinator stream: this party's name and its queue. Returns the
    /// cloud keys to announce on it.
    pub fn connected(
        &self,
        me: &str,
        uplink: tokio::sync::mpsc::Sender<pb::PartyMessage>,
        coordinator_max_message_bytes: usize,
    ) -> Vec<pb::CloudKey> {
        *self.me.write().unwrap_or_else(|p| p.into_inner()) = me.to_owned();
        *self.uplink.lock().unwrap_or_else(|p| p.into_inner()) = Some(uplink);
        self.joint.connected(coordinator_max_message_bytes);
        self.joint.announcements(me)
    }

    /// The stream closed: pending forwards fall back at once, and model
    /// downloads under way are forgotten (their parts came on that stream
    /// only), so that the deployment sent again on the next one is pulled
    /// again.
    pub fn disconnected(&self) {
        *self.uplink.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.pulls.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.joint.disconnected();
    }

    /// A cloud party's key relayed by the coordinator.
    pub fn on_cloud_key(&self, a: &pb::CloudKeyAnnouncement) -> Result<(), String> {
        self.joint.on_cloud_key(a)
    }

    /// The answer to one of this party's forwarded requests.
    pub fn on_forward_answer(&self, a: pb::ForwardAnswer) -> Result<(), String> {
        self.joint.on_answer(a)
    }

    /// Cloud side: a slot to answer one forwarded request of `edge` in,
    /// held until its answer is sent; `None` when
    /// [`joint::MAX_FORWARDS_IN_FLIGHT`] are being answered, or
    /// [`joint::MAX_FORWARDS_PER_EDGE`] of that edge's.
    pub fn forward_slot(&self, edge: &str) -> Option<joint::ForwardSlot> {
        self.joint.forward_slot(edge)
    }

    /// Cloud side: answers an edge party's forwarded request with the cloud
    /// service's current version (in a [`Registry::forward_slot`]).
    pub async fn on_forwarded(&self, f: pb::Forward) -> pb::ForwardAnswer {
        // Names the coordinator relays are checked before they are logged
        // or echoed: a message of megabytes must not become as much log.
        if confide_crypto::pki::validate_party_name(&f.peer).is_err()
            || confide_proto::deploy::validate_service_name(&f.cloud_service).is_err()
        {
            warn!("refusing a forwarded request whose edge party or cloud service is not a valid name");
            let error = "a forwarded request whose edge party or cloud service is not a valid name".to_string();
            return pb::ForwardAnswer { request_id: f.request_id, peer: String::new(), ciphertext: Vec::new(), error };
        }
        let me = self.me.read().unwrap_or_else(|p| p.into_inner()).clone();
        let answer = async {
            let (rows, width, reply) = self.joint.open_request(&me, &f)?;
            let count = rows.len() / width;
            let p = self.predict(&f.cloud_service, rows, count, width).await.map_err(|e| e.to_string())?;
            let r = &p.served.deployment.record;
            let version = joint::CloudVersion {
                party: me.clone(),
                service: f.cloud_service.clone(),
                sequence: r.sequence,
                job_id: r.job_id.clone(),
                round: r.round,
                sha256: r.sha256.clone(),
            };
            self.joint.seal_answer(&me, &f, reply, p.served.classes(), p.probabilities, version)
        }
        .await;
        match answer {
            Ok(ciphertext) => {
                pb::ForwardAnswer { request_id: f.request_id, peer: f.peer, ciphertext, error: String::new() }
            }
            Err(e) => {
                warn!(edge = %f.peer, service = %f.cloud_service, "cannot answer a forwarded request: {e}");
                pb::ForwardAnswer { request_id: f.request_id, peer: f.peer, ciphertext: Vec::new(), error: e }
            }
        }
    }

    /// Answers a request: the edge model, and for a service deployed with a
    /// cloud tier, the cloud model for the rows the edge finds hard (when
    /// the policy lets them go, the cloud's key is verified and it answers
    /// in time; otherwise the edge's answer, flagged).
    pub async fn answer(
        &self,
        service: &str,
        rows: Vec<f32>,
        count: usize,
        width: usize,
    ) -> Result<Answer, ServeError> {
        let started = std::time::Instant::now();
        let answer = self.answer_rows(service, rows, count, width).await;
        if !self.services.contains_key(service) {
            return answer;
        }
        let n = |source: RowSource| match &answer {
            Ok(a) => a.sources.iter().filter(|s| **s == source).count() as u64,
            Err(_) => 0,
        };
        let (edge, cloud, edge_hard) = (n(RowSource::Edge), n(RowSource::Cloud), n(RowSource::EdgeHard));
        {
            let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
            let t = tally
                .entry(service.to_owned())
                .or_insert_with(|| pb::ServiceRows { service: service.to_owned(), ..Default::default() });
            t.requests += 1;
            t.edge_rows += edge;
            t.cloud_rows += cloud;
            t.edge_hard_rows += edge_hard;
        }
        if let Some(m) = self.metrics.get() {
            let rows = [("edge", edge), ("cloud", cloud), ("edge_hard", edge_hard)];
            m.inference(service, answer.is_ok(), started.elapsed(), &rows);
        }
        answer
    }

    /// Each service's requests and rows by source since the node started.
    pub fn tally(&self) -> Vec<pb::ServiceRows> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Counts requests, latency and who answered which rows in `metrics`.
    pub fn count_in(&self, metrics: crate::telemetry::SharedMetrics) {
        let _ = self.metrics.set(metrics);
    }

    async fn answer_rows(
        &self,
        service: &str,
        rows: Vec<f32>,
        count: usize,
        width: usize,
    ) -> Result<Answer, ServeError> {
        let keep = if self.current(service)?.deployment.record.joint.is_some() { Some(rows.clone()) } else { None };
        let p = self.predict(service, rows, count, width).await?;
        let k = p.served.classes().max(1);
        let mut answer = Answer {
            sources: vec![RowSource::Edge; count],
            probabilities: p.probabilities,
            served: p.served,
            cloud: None,
            fallback: None,
        };
        let Some(j) = answer.served.deployment.record.joint.clone() else { return Ok(answer) };
        let hard: Vec<usize> =
            (0..count).filter(|&i| j.hard_examples.is_hard(&answer.probabilities[i * k..(i + 1) * k])).collect();
        if hard.is_empty() {
            return Ok(answer);
        }
        let Some(rows) = keep else {
            // The version that answered has a cloud tier the one read
            // before did not (a swap in between): its rule still flags the
            // hard rows, answered by the edge, and says why (found by review).
            for &i in &hard {
                answer.sources[i] = RowSource::EdgeHard;
            }
            answer.fallback = Some("the service was swapped to a version with a cloud tier during this request".into());
            return Ok(answer);
        };
        let hard_rows: Vec<f32> = hard.iter().flat_map(|&i| rows[i * width..(i + 1) * width].iter().copied()).collect();
        if let Some(w) = self.hard_examples.get() {
            // Kept for labelling off the request's path: the answer does not
            // wait for the file, and one writer takes the queue.
            if w.queue_hard_examples(service, hard_rows.clone(), width) {
                let w = w.clone();
                tokio::task::spawn_blocking(move || w.write_queued());
            }
        }
        let me = self.me.read().unwrap_or_else(|p| p.into_inner()).clone();
        let uplink = self.uplink.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match self.joint.forward(&me, uplink, service, &j, &hard_rows, width, k).await {
            Ok((probs, mut version)) => {
                // Who answered is the deployment's cloud tier, whatever the
                // cloud's answer names (its own words, passed to the client).
                version.party.clone_from(&j.cloud);
                version.service.clone_from(&j.cloud_service);
                for (n, &i) in hard.iter().enumerate() {
                    answer.probabilities[i * k..(i + 1) * k].copy_from_slice(&probs[n * k..(n + 1) * k]);
                    answer.sources[i] = RowSource::Cloud;
                }
                answer.cloud = Some(version);
            }
            Err(why) => {
                for &i in &hard {
                    answer.sources[i] = RowSource::EdgeHard;
                }
                // The cloud's or coordinator's words can quote what they
                // sent (a serde error does): bounded, as the refusal is.
                answer.fallback = Some(why.chars().take(MAX_FALLBACK_CHARS).collect());
            }
        }
        Ok(answer)
    }

    /// Answers `count` rows of `width` features (row-major) with the
    /// service's current version, batched with concurrent requests.
    pub async fn predict(
        &self,
        service: &str,
        rows: Vec<f32>,
        count: usize,
        width: usize,
    ) -> Result<Prediction, ServeError> {
        let svc = self.services.get(service).ok_or_else(|| ServeError::UnknownService(service.to_owned()))?;
        if count > self.config.max_rows {
            return Err(ServeError::TooLarge(format!(
                "rows: {count} rows, at most {} per request ([serve] max_rows)",
                self.config.max_rows
            )));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = PredictJob { rows, count, width, reply: tx };
        svc.worker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(WorkerMsg::Predict(job))
            .map_err(|_| ServeError::Failed(format!("the worker of service {service} has stopped")))?;
        rx.await.map_err(|_| ServeError::Failed(format!("the worker of service {service} dropped the request")))?
    }
}

/// A service's worker: owns the model, answers queued requests in batches
/// of up to `max_batch_rows` rows, and swaps models between batches.
fn worker(service: &str, rx: Receiver<WorkerMsg>, max_batch_rows: usize) {
    let mut model: Option<(Box<dyn Trainer>, Arc<Served>)> = None;
    let mut next: Option<WorkerMsg> = None;
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        match msg {
            WorkerMsg::Swap(m, served) => model = Some((m, served)),
            WorkerMsg::Predict(first) => {
                let mut rows = first.count;
                let mut batch = vec![first];
                while rows < max_batch_rows {
                    match rx.try_recv() {
                        Ok(WorkerMsg::Predict(j)) => {
                            rows += j.count;
                            batch.push(j);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                    }
                }
                answer(service, model.as_ref(), batch);
            }
        }
    }
}

fn answer(service: &str, model: Option<&(Box<dyn Trainer>, Arc<Served>)>, batch: Vec<PredictJob>) {
    let Some((m, served)) = model else {
        for j in batch {
            let _ = j.reply.send(Err(ServeError::NotReady(service.to_owned())));
        }
        return;
    };
    let mut ok = Vec::with_capacity(batch.len());
    for j in batch {
        // A request given up on (its client gone, or past the endpoint's
        // timeout) is not worked on: under overload the queue would
        // otherwise answer only requests nobody waits for.
        if j.reply.is_closed() {
            continue;
        }
        if j.width == served.width && j.rows.len() == j.count * j.width {
            ok.push(j);
        } else {
            let _ = j.reply.send(Err(ServeError::WrongWidth {
                service: service.to_owned(),
                what: "rows".into(),
                got: j.width,
                expected: served.width,
            }));
        }
    }
    if ok.is_empty() {
        return;
    }
    let all: Vec<f32> = if ok.len() == 1 {
        std::mem::take(&mut ok[0].rows)
    } else {
        ok.iter().flat_map(|j| j.rows.iter().copied()).collect()
    };
    match m.predict(&all) {
        Ok(probs) if probs.len() == all.len() / served.width.max(1) * served.classes() => {
            let mut at = 0;
            for j in ok {
                let n = j.count * served.classes();
                let probabilities = probs[at..at + n].to_vec();
                at += n;
                let _ = j.reply.send(Ok(Prediction { probabilities, served: served.clone() }));
            }
        }
        Ok(probs) => {
            let why = format!(
                "the model returned {} probabilities for {} rows",
                probs.len(),
                all.len() / served.width.max(1)
            );
            for j in ok {
                let _ = j.reply.send(Err(ServeError::Failed(why.clone())));
            }
        }
        Err(e) => {
            for j in ok {
                let _ = j.reply.send(Err(ServeError::Failed(e.to_string())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::ModelConfig;
    use confide_algorithms::data::Dataset;
    use confide_crypto::identity::IdentityKey;
    use confide_crypto::pki::{ADMIN_NAME, PkiDir};
    use confide_crypto::revocation::Revocations;
    use confide_proto::deploy::{DeployAction, DeploymentRecord};

    use std::time::Duration;

    const LOGREG: &str = "kind = \"logistic_regression\"\nclasses = 2\n";

    struct Fixture {
        dir: tempfile::TempDir,
        pki: PkiDir,
        config: PartyConfig,
        revocations: SharedRevocations,
    }

    fn der(pem: &[u8]) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap().to_vec()
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into(), "c".into()], &[]).unwrap();
        let path = dir.path().join("a.toml");
        let text = format!(
            "coordinator = \"https://x:1\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[serve]\nservices = [\"triage\"]\nmax_batch_rows = 64\n",
            pki.ca_cert().display(),
            pki.party_cert("a").display(),
            pki.party_key("a").display()
        );
        std::fs::write(&path, text).unwrap();
        let config = PartyConfig::load(&path).unwrap();
        Fixture { dir, pki, config, revocations: Arc::new(RwLock::new(Revocations::empty())) }
    }

    /// A trained two-class model over 3 features, as safetensors bytes.
    fn model_bytes(seed: u64) -> Vec<u8> {
        let rows: Vec<f32> = (0..40).map(|i| ((i * 7 + seed as usize) % 11) as f32 / 5.0).collect();
        let labels: Vec<u32> = (0..rows.len() / 4 * 4 / 3).map(|i| (i % 2) as u32).collect();
        let n = labels.len();
        let train = Dataset { features: rows[..n * 3].to_vec(), labels, num_features: 3 };
        let none = Dataset { num_features: 3, ..Default::default() };
        let mut m = BuiltinTrainers::default()
            .build_model(&ModelConfig::logistic_regression(2), seed, train, none, "a")
            .unwrap();
        let tc = confide_algorithms::FitConfig { round: 1, train: Default::default() };
        m.fit(&tc).unwrap();
        m.parameters().unwrap().to_safetensors(&Default::default()).unwrap()
    }

    fn record(seq: u64, bytes: &[u8], architecture: &str) -> DeploymentRecord {
        DeploymentRecord {
            service: "triage".into(),
            sequence: seq,
            action: DeployAction::Deploy,
            job_id: "job-1".into(),
            round: seq as u32,
            sha256: sha256_hex(bytes),
            architecture: architecture.into(),
            rollback_to: seq.checked_sub(1).filter(|&s| s > 0),
            issued_at: 1,
            admin: ADMIN_NAME.into(),
            joint: None,
            pipeline: None,
        }
    }

    fn admin_signed(f: &Fixture, r: DeploymentRecord) -> pb::ServiceDeployment {
        let key = IdentityKey::from_pem(&std::fs::read(f.pki.admin_key()).unwrap()).unwrap();
        let cert = der(&std::fs::read(f.pki.admin_cert()).unwrap());
        SignedDeployment::sign(r, &key, cert).unwrap().to_pb()
    }

    /// Offers a deployment and delivers its model in two parts, and
    /// installs it.
    fn deliver(reg: &Registry, msg: &pb::ServiceDeployment, bytes: &[u8]) -> Result<(), String> {
        let (d, got) = pulled(reg, msg, bytes)?;
        reg.install(d, &got, true)
    }

    /// Offers a deployment and delivers its model in two parts: what is
    /// then to install.
    fn pulled(
        reg: &Registry,
        msg: &pb::ServiceDeployment,
        bytes: &[u8],
    ) -> Result<(SignedDeployment, Vec<u8>), String> {
        let pull = reg.offer(msg)?.ok_or("nothing to pull")?;
        let half = bytes.len() / 2;
        assert!(reg.on_part(model_part(&pull, 0, &bytes[..half], bytes.len()))?.is_none());
        reg.on_part(model_part(&pull, half, &bytes[half..], bytes.len()))?.ok_or_else(|| "incomplete".into())
    }

    /// The part of `pull`'s model at `offset`, announcing `total` bytes.
    fn model_part(pull: &pb::ModelPull, offset: usize, data: &[u8], total: usize) -> pb::ModelPart {
        pb::ModelPart {
            service: pull.service.clone(),
            sequence: pull.sequence,
            total_bytes: total as u64,
            offset: offset as u64,
            data: data.to_vec().into(),
            error: String::new(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().build().unwrap()
    }

    /// A download cut off by the stream's end is pulled again when the
    /// coordinator sends the deployment again on the next stream (its
    /// parts came on the old one only): the party does not keep serving
    /// the old version, or nothing, for want of parts that never come.
    #[test]
    fn a_download_cut_off_by_a_disconnection_is_pulled_again() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let v1 = model_bytes(1);
        let d1 = admin_signed(&f, record(1, &v1, LOGREG));
        let pull = reg.offer(&d1).unwrap().expect("a pull");
        assert!(reg.on_part(model_part(&pull, 0, &v1[..v1.len() / 2], v1.len())).unwrap().is_none());
        assert_eq!(reg.offer(&d1).unwrap(), None, "the same stream: the download goes on");
        reg.disconnected();
        assert_eq!(reg.offer(&d1).unwrap(), Some(pull), "pulled again on the next stream");
        deliver_pulled(&reg, &d1, &v1);
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 1);
    }

    /// Words the coordinator relays are bounded before they are echoed or
    /// logged: a forward naming a megabyte "party" or "service" is refused
    /// without repeating it, and a pull's error is cut (found by review).
    #[tokio::test]
    async fn relayed_names_and_errors_are_bounded_before_they_are_echoed() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let huge = "x".repeat(1 << 20);
        for f in [
            pb::Forward { peer: huge.clone(), cloud_service: "triage".into(), ..Default::default() },
            pb::Forward { peer: "a".into(), cloud_service: huge.clone(), ..Default::default() },
        ] {
            let a = reg.on_forwarded(f).await;
            assert!(
                a.error.contains("not a valid name") && a.error.len() < 200 && a.peer.is_empty(),
                "{}",
                a.error.len()
            );
        }
        let v1 = model_bytes(1);
        let d1 = admin_signed(&f, record(1, &v1, LOGREG));
        let pull = reg.offer(&d1).unwrap().expect("a pull");
        let mut part = model_part(&pull, 0, &[], v1.len());
        part.error = huge;
        let e = reg.on_part(part).unwrap_err();
        assert!(e.contains("could not send the model") && e.len() < 700, "{}", e.len());
    }

    /// The size the first part of a pulled model announces holds for the
    /// rest: a later part announcing another fails the pull (found by
    /// review), and the model can be pulled again.
    #[test]
    fn a_pulled_models_parts_must_announce_one_size() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let v1 = model_bytes(1);
        let d1 = admin_signed(&f, record(1, &v1, LOGREG));
        let pull = reg.offer(&d1).unwrap().expect("a pull");
        let half = v1.len() / 2;
        assert!(reg.on_part(model_part(&pull, 0, &v1[..half], v1.len())).unwrap().is_none());
        let e = reg.on_part(model_part(&pull, half, &v1[half..], v1.len() + 1)).unwrap_err();
        assert!(e.contains("announce different sizes"), "{e}");
        reg.disconnected();
        assert_eq!(reg.offer(&d1).unwrap(), Some(pull), "pulled again");
        deliver_pulled(&reg, &d1, &v1);
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 1);
    }

    /// Delivers `bytes` for the pull of `msg` already asked for, and installs it.
    fn deliver_pulled(reg: &Registry, msg: &pb::ServiceDeployment, bytes: &[u8]) {
        let record: DeploymentRecord = serde_json::from_slice(&msg.record).unwrap();
        let part = pb::ModelPart {
            service: record.service.clone(),
            sequence: record.sequence,
            total_bytes: bytes.len() as u64,
            offset: 0,
            data: bytes.to_vec().into(),
            error: String::new(),
        };
        let (d, got) = reg.on_part(part).unwrap().expect("complete");
        reg.install(d, &got, true).unwrap();
    }

    #[test]
    fn a_party_serves_only_what_an_administrator_signed_and_never_an_older_one() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let (v1, v2) = (model_bytes(1), model_bytes(2));
        assert_eq!(reg.current("triage").unwrap_err(), ServeError::NotReady("triage".into()));
        // Signed by an administrator: pulled, checked and served.
        let d1 = admin_signed(&f, record(1, &v1, LOGREG));
        deliver(&reg, &d1, &v1).unwrap();
        let rows = vec![0.5, 1.0, 1.5, 0.0, 0.1, 0.2];
        let p = rt().block_on(reg.predict("triage", rows.clone(), 2, 3)).unwrap();
        let direct = BuiltinTrainers::default()
            .inference_model(&ModelConfig::logistic_regression(2), &Parameters::from_safetensors(&v1).unwrap())
            .unwrap()
            .predict(&rows)
            .unwrap();
        assert_eq!((p.probabilities, p.served.deployment.record.sequence), (direct, 1));
        // The same deployment again (a reconnect) is nothing to do.
        assert_eq!(reg.offer(&d1).unwrap(), None);

        // A party's certificate cannot deploy, nor can anyone edit a record.
        let party_key = IdentityKey::from_pem(&std::fs::read(f.pki.party_key("a")).unwrap()).unwrap();
        let party_cert = der(&std::fs::read(f.pki.party_cert("a")).unwrap());
        let mut forged_record = record(2, &v2, LOGREG);
        forged_record.admin = "a".into();
        let forged = SignedDeployment::sign(forged_record, &party_key, party_cert).unwrap().to_pb();
        assert!(reg.offer(&forged).unwrap_err().contains("Party certificate a"));
        let mut edited = admin_signed(&f, record(2, &v2, LOGREG));
        edited.record = serde_json::to_vec(&record(2, &v1, LOGREG)).unwrap();
        assert!(reg.offer(&edited).unwrap_err().contains("does not verify"));
        // Another deployment under a sequence already served.
        let other1 = admin_signed(&f, record(1, &v2, LOGREG));
        assert!(reg.offer(&other1).unwrap_err().contains("another deployment 1"));

        // A model whose bytes are not the signed ones.
        let d2 = admin_signed(&f, record(2, &v2, LOGREG));
        let e = deliver(&reg, &d2, &v1).unwrap_err();
        assert!(e.contains("SHA-256") && e.contains("not the signed"), "{e}");
        // A model that is not the signed architecture.
        let mlp = admin_signed(&f, record(2, &v2, "kind = \"mlp\"\nclasses = 2\nhidden = [4]\n"));
        let e = deliver(&reg, &mlp, &v2).unwrap_err();
        assert!(e.contains("not its signed architecture"), "{e}");
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 1, "nothing refused was swapped in");

        // Version 2 goes in; then the coordinator replays version 1.
        deliver(&reg, &d2, &v2).unwrap();
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 2);
        let e = reg.offer(&d1).unwrap_err();
        assert!(e.contains("older than the 2 taken here"), "{e}");
        // A deployment of a service this party does not serve is ignored.
        let mut other = record(1, &v1, LOGREG);
        other.service = "billing".into();
        assert_eq!(reg.offer(&admin_signed(&f, other)).unwrap(), None);
        // Parts nobody pulled are refused.
        let stray = pb::ModelPart { service: "triage".into(), sequence: 9, total_bytes: 1, ..Default::default() };
        assert!(reg.on_part(stray).unwrap_err().contains("not pulled"));

        // After a restart the kept deployment is verified and served at
        // once, and the replay is still refused.
        drop(reg);
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 2);
        assert!(reg.offer(&d1).unwrap_err().contains("a replay"));
        // A tampered store is not served; the replay is refused all the
        // same (the high-water mark is kept apart), and the deployment
        // taken before is taken again.
        let kept = f.config.serve_dir().join("triage").join(format!("model-{}.safetensors", sha256_hex(&v2)));
        std::fs::write(&kept, &v1).unwrap();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        assert!(reg.current("triage").is_err());
        let e = reg.offer(&d1).unwrap_err();
        assert!(e.contains("older than the 2 taken here"), "{e}");
        assert!(reg.offer(&other1).is_err());
        let other2 = admin_signed(&f, record(2, &v1, LOGREG));
        assert!(reg.offer(&other2).unwrap_err().contains("another deployment 2"));
        deliver(&reg, &d2, &v2).unwrap();
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 2);
        // An unreadable mark takes nothing, naming the file.
        let mark = f.config.serve_dir().join("triage").join("high-water.json");
        std::fs::write(&mark, "{").unwrap();
        let e = reg.offer(&admin_signed(&f, record(3, &v1, LOGREG))).unwrap_err();
        assert!(e.contains("high-water.json") && e.contains("takes no deployment of triage"), "{e}");
        // A store kept before the mark existed gets one from its deployment
        // when it opens, even one that then does not load.
        drop(reg);
        std::fs::remove_file(&mark).unwrap();
        std::fs::write(&kept, &v1).unwrap();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        assert!(reg.current("triage").is_err());
        assert!(reg.offer(&d1).unwrap_err().contains("older than the 2 taken here"));
        let _ = &f.dir;
    }

    /// A party with no deployment of a service yet takes none older than
    /// `serve.min_sequence` names: without it the coordinator could hand a
    /// new party any old signed deployment (found by review).
    #[test]
    fn a_party_new_to_a_service_takes_nothing_older_than_its_configured_floor() {
        let f = fixture();
        let mut config = f.config.clone();
        config.serve.min_sequence.insert("triage".into(), 3);
        let reg = Registry::open(&config, f.revocations.clone()).unwrap().unwrap();
        let (v1, v3) = (model_bytes(1), model_bytes(3));
        let e = reg.offer(&admin_signed(&f, record(1, &v1, LOGREG))).unwrap_err();
        assert!(e.contains("older than serve.min_sequence.triage = 3"), "{e}");
        assert!(reg.current("triage").is_err(), "nothing served");
        deliver(&reg, &admin_signed(&f, record(3, &v3, LOGREG)), &v3).unwrap();
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 3);
        // Validated: a floor of 0, and one for a service not served (a warning).
        let load = |extra: &str| {
            let path = f.dir.path().join("floor.toml");
            let text = format!(
                "coordinator = \"https://x:1\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n[serve]\nservices =                  [\"triage\"]\n[serve.min_sequence]\n{extra}\n",
                f.pki.ca_cert().display(),
                f.pki.party_cert("a").display(),
                f.pki.party_key("a").display()
            );
            std::fs::write(&path, text).unwrap();
            PartyConfig::load(&path)
        };
        let e = load("triage = 0").unwrap_err();
        assert!(e.to_string().contains("serve.min_sequence.triage: sequences start at 1"), "{e}");
        let c = load("other = 2").unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("serve.min_sequence.other")), "{:?}", c.warnings);
    }

    /// Installs run one at a time per service: of the models pulled while
    /// one installs, only the newest waits (a coordinator sending
    /// deployments faster than they install holds no more here), and two
    /// records of one sequence, pulled before either is installed, do not
    /// both go in.
    #[test]
    fn installs_run_one_at_a_time_and_only_the_newest_waits() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let (v1, v2, v3) = (model_bytes(1), model_bytes(2), model_bytes(3));
        deliver(&reg, &admin_signed(&f, record(1, &v1, LOGREG)), &v1).unwrap();
        // Two records of sequence 2 (a coordinator that showed two
        // administrators the same history), both pulled.
        let (a, a_bytes) = pulled(&reg, &admin_signed(&f, record(2, &v2, LOGREG)), &v2).unwrap();
        let (b, b_bytes) = pulled(&reg, &admin_signed(&f, record(2, &v3, LOGREG)), &v3).unwrap();
        reg.install(a.clone(), &a_bytes, true).unwrap();
        let e = reg.install(b, &b_bytes, true).unwrap_err();
        assert!(e.contains("two records of one sequence"), "{e}");
        reg.install(a, &a_bytes, true).expect("the one served, again: nothing to do");
        assert_eq!(reg.current("triage").unwrap().deployment.record.sha256, sha256_hex(&v2));
        // Pulled while an install runs: 3, then 5, then 4 (older than 5).
        let (d3, b3) = pulled(&reg, &admin_signed(&f, record(3, &v3, LOGREG)), &v3).unwrap();
        let (d4, b4) = pulled(&reg, &admin_signed(&f, record(4, &v1, LOGREG)), &v1).unwrap();
        let (d5, b5) = pulled(&reg, &admin_signed(&f, record(5, &v2, LOGREG)), &v2).unwrap();
        assert!(reg.queue_install(d3, b3), "no install runs: the caller runs it");
        assert!(!reg.queue_install(d5, b5), "one runs: it takes this up");
        assert!(!reg.queue_install(d4, b4), "older than the one waiting: dropped");
        {
            let installs = reg.installs.lock().unwrap();
            assert_eq!(installs.waiting.len(), 1, "one model waits per service");
            assert_eq!(installs.waiting["triage"].0.record.sequence, 5);
        }
        reg.run_installs("triage");
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 5);
        let (d6, b6) = pulled(&reg, &admin_signed(&f, record(6, &v3, LOGREG)), &v3).unwrap();
        assert!(reg.queue_install(d6, b6), "the run ended with nothing waiting");
        reg.run_installs("triage");
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 6);
        let _ = &f.dir;
    }

    /// A pipeline's deployment, signed by the coordinator under the
    /// administrator's grant, is served and kept with its grant (verified
    /// again after a restart); once the grant has expired by this party's
    /// clock, no new one is taken, whatever the record's own time says.
    #[test]
    fn a_pipeline_deploys_under_its_grant_until_it_expires() {
        use confide_proto::deploy::{PipelineGrant, PipelineStep, SignedGrant, coordinator_signer};
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let (v1, v2, v3) = (model_bytes(1), model_bytes(2), model_bytes(3));
        deliver(&reg, &admin_signed(&f, record(1, &v1, LOGREG)), &v1).unwrap();
        let (admin_key, admin_cert, _) = confide_proto::deploy::admin_signer(&f.pki).unwrap();
        let (coord_key, coord_cert, coord_name) = coordinator_signer(&f.pki).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let grant = |expires_at: u64| {
            let g = PipelineGrant {
                service: "triage".into(),
                spec_sha256: "ab".repeat(32),
                architecture: LOGREG.into(),
                joint: None,
                after_sequence: 1,
                issued_at: now - 100,
                expires_at,
                admin: ADMIN_NAME.into(),
            };
            SignedGrant::sign(g, &admin_key, admin_cert.clone()).unwrap()
        };
        let by_pipeline = |seq: u64, bytes: &[u8], g: SignedGrant| {
            let mut r = record(seq, bytes, LOGREG);
            r.admin = coord_name.clone();
            r.issued_at = now - 50;
            r.pipeline = Some(PipelineStep {
                job: "p1".into(),
                spec_sha256: "ab".repeat(32),
                iteration: 1,
                reason: "gate".into(),
            });
            SignedDeployment::sign_under_grant(r, g, &coord_key, coord_cert.clone()).unwrap().to_pb()
        };
        deliver(&reg, &by_pipeline(2, &v2, grant(now + 3600)), &v2).unwrap();
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 2);
        drop(reg);
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let served = reg.current("triage").unwrap();
        assert_eq!(served.deployment.record.sequence, 2, "kept with its grant and verified again");
        assert!(served.deployment.grant.is_some());
        // An administrator deploys 3 (say, rolls the pipeline's model
        // back): the grant, signed after deployment 1, does not undo it,
        // before or after a restart; a grant signed after 3 does.
        deliver(&reg, &admin_signed(&f, record(3, &v3, LOGREG)), &v3).unwrap();
        let e = reg.offer(&by_pipeline(4, &v2, grant(now + 3600))).unwrap_err();
        assert!(e.contains("before the administrator's deployment 3 taken here"), "{e}");
        drop(reg);
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let e = reg.offer(&by_pipeline(4, &v2, grant(now + 3600))).unwrap_err();
        assert!(e.contains("before the administrator's deployment 3 taken here"), "{e}");
        let later = |expires_at: u64| {
            let g = PipelineGrant { after_sequence: 3, ..grant(expires_at).grant };
            SignedGrant::sign(g, &admin_key, admin_cert.clone()).unwrap()
        };
        deliver(&reg, &by_pipeline(4, &v2, later(now + 3600)), &v2).unwrap();
        let e = reg.offer(&by_pipeline(5, &v3, grant(now - 10))).unwrap_err();
        assert!(e.contains("grant that expired"), "{e}");
        // Nor one that jumps far ahead (it would leave the administrator no
        // sequence above it).
        let e = reg.offer(&by_pipeline(MAX_PIPELINE_SEQUENCE + 1, &v3, later(now + 3600))).unwrap_err();
        assert!(e.contains("past the largest a pipeline may use"), "{e}");
        assert!(reg.offer(&by_pipeline(MAX_PIPELINE_SEQUENCE, &v3, later(now + 3600))).unwrap().is_some());
        let refused = pb::ModelPart {
            service: "triage".into(),
            sequence: MAX_PIPELINE_SEQUENCE,
            error: "gone".into(),
            ..Default::default()
        };
        assert!(reg.on_part(refused).is_err(), "that pull ends");
        // Checked again at install: an administrator's deployment pulled
        // before a pipeline's and installed first ends the grant for it.
        let (admin6, admin6_bytes) = pulled(&reg, &admin_signed(&f, record(6, &v1, LOGREG)), &v1).unwrap();
        let (pipeline7, pipeline7_bytes) = pulled(&reg, &by_pipeline(7, &v2, later(now + 3600)), &v2).unwrap();
        reg.install(admin6, &admin6_bytes, true).unwrap();
        let e = reg.install(pipeline7, &pipeline7_bytes, true).unwrap_err();
        assert!(e.contains("before the administrator's deployment 6 taken here"), "{e}");
        // And its expiry: a model whose parts the coordinator held back
        // until after the grant expired is not installed (found by review).
        let after6 = |expires_at: u64| {
            let g = PipelineGrant { after_sequence: 6, ..grant(expires_at).grant };
            SignedGrant::sign(g, &admin_key, admin_cert.clone()).unwrap()
        };
        let expired = reg.verify(&by_pipeline(8, &v3, after6(now - 10))).unwrap();
        let e = reg.install(expired, &v3, true).unwrap_err();
        assert!(e.contains("grant that expired"), "{e}");
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 6);
        let in_time = reg.verify(&by_pipeline(8, &v3, after6(now + 3600))).unwrap();
        reg.install(in_time, &v3, true).unwrap();
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 8);
        let _ = &f.dir;
    }

    #[test]
    fn a_cloud_key_is_kept_only_as_its_party_signed_it() {
        use confide_crypto::sealed::CloudSecret;
        use confide_crypto::secagg::protocol::IdentitySigner;
        let f = fixture();
        let edge = config_of(&f, "a", "[serve]\nservices = [\"triage\"]\n[policy.share_inputs]\ntriage = [\"c\"]\n");
        let reg = Registry::open(&edge, f.revocations.clone()).unwrap().unwrap();
        let id = |p: &str| IdentityKey::from_pem(&std::fs::read(f.pki.party_key(p)).unwrap()).unwrap();
        let cert = |p: &str| der(&std::fs::read(f.pki.party_cert(p)).unwrap());
        let announce = |party: &str, cert: Vec<u8>, public: [u8; 32], signer: &IdentityKey, as_party: &str| {
            let signature =
                signer.sign(&confide_crypto::sealed::cloud_key_transcript(as_party, "svc", &public, 5)).unwrap();
            pb::CloudKeyAnnouncement {
                party: party.into(),
                key: Some(pb::CloudKey { service: "svc".into(), public_key: public.to_vec(), issued_at: 5, signature }),
                certificate: cert,
            }
        };
        let real = CloudSecret::generate(&mut rand_core::OsRng).public();
        let coordinators = CloudSecret::generate(&mut rand_core::OsRng).public();
        reg.on_cloud_key(&announce("c", cert("c"), real, &id("c"), "c")).unwrap();
        assert_eq!(reg.joint.keys_of("c"), 1);
        // A party the policy shares nothing with: verified, not kept.
        reg.on_cloud_key(&announce("a", cert("a"), real, &id("a"), "a")).unwrap();
        assert_eq!(reg.joint.keys_of("a"), 0);
        // At most 64 service keys of one cloud party.
        for i in 1..64 {
            let service = format!("svc{i}");
            let signature =
                id("c").sign(&confide_crypto::sealed::cloud_key_transcript("c", &service, &real, 5)).unwrap();
            let key = pb::CloudKey { service, public_key: real.to_vec(), issued_at: 5, signature };
            reg.on_cloud_key(&pb::CloudKeyAnnouncement { party: "c".into(), key: Some(key), certificate: cert("c") })
                .unwrap();
        }
        assert_eq!(reg.joint.keys_of("c"), 64);
        let signature = id("c").sign(&confide_crypto::sealed::cloud_key_transcript("c", "svc64", &real, 5)).unwrap();
        let key = pb::CloudKey { service: "svc64".into(), public_key: real.to_vec(), issued_at: 5, signature };
        let e = reg
            .on_cloud_key(&pb::CloudKeyAnnouncement { party: "c".into(), key: Some(key), certificate: cert("c") })
            .unwrap_err();
        assert!(e.contains("already holds 64 of c's service keys"), "{e}");
        // A service name that is no service's, signed by c, is refused at
        // the edge itself (found by review: only the coordinator checked
        // it), echoed bounded.
        let long = "s".repeat(100_000);
        let signature = id("c").sign(&confide_crypto::sealed::cloud_key_transcript("c", &long, &real, 5)).unwrap();
        let key = pb::CloudKey { service: long, public_key: real.to_vec(), issued_at: 5, signature };
        let e = reg
            .on_cloud_key(&pb::CloudKeyAnnouncement { party: "c".into(), key: Some(key), certificate: cert("c") })
            .unwrap_err();
        assert!(e.contains("cloud_key.service") && e.len() < 300, "{}", &e[..e.len().min(300)]);
        // The coordinator swaps in its own key under c's signature.
        let mut swapped = announce("c", cert("c"), real, &id("c"), "c");
        if let Some(k) = swapped.key.as_mut() {
            k.public_key = coordinators.to_vec();
        }
        assert!(reg.on_cloud_key(&swapped).unwrap_err().contains("signature does not verify"));
        // Or has another party (a) sign it, with a's certificate, as c's.
        let e = reg.on_cloud_key(&announce("c", cert("a"), coordinators, &id("a"), "c")).unwrap_err();
        assert!(e.contains("names a"), "{e}");
        // A certificate of another CA.
        let evil = confide_crypto::pki::FederationCa::generate("evil")
            .unwrap()
            .issue(confide_crypto::pki::Role::Party, "c", &[])
            .unwrap();
        let evil_key = IdentityKey::from_pem(evil.key_pem.as_bytes()).unwrap();
        let e =
            reg.on_cloud_key(&announce("c", der(evil.cert_pem.as_bytes()), coordinators, &evil_key, "c")).unwrap_err();
        assert!(e.contains("not issued by the federation CA"), "{e}");
        // c revoked: its key is refused from then on.
        let serial = confide_crypto::revocation::certificate_serial(&cert("c")).unwrap();
        let list = f.pki.load_ca().unwrap().revoke(&Revocations::empty(), &serial).unwrap();
        f.revocations.write().unwrap().update(list).unwrap();
        let e = reg.on_cloud_key(&announce("c", cert("c"), real, &id("c"), "c")).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
    }

    /// Party `p`'s config in the fixture's federation, with `extra` TOML.
    fn config_of(f: &Fixture, p: &str, extra: &str) -> PartyConfig {
        let path = f.dir.path().join(format!("{p}-joint.toml"));
        let text = format!(
            "coordinator = \"https://x:1\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{extra}",
            f.pki.ca_cert().display(),
            f.pki.party_cert(p).display(),
            f.pki.party_key(p).display()
        );
        std::fs::write(&path, text).unwrap();
        PartyConfig::load(&path).unwrap()
    }

    /// Edge a (which may share triage with c) and cloud c (which answers
    /// triage), each with its own state dir; c's key announced to a.
    fn edge_and_cloud(f: &Fixture, accept_from: &str) -> (joint::Joint, joint::Joint) {
        edge_and_cloud_with(f, accept_from, "")
    }

    /// [`edge_and_cloud`] with `extra` in both parties' configurations.
    fn edge_and_cloud_with(f: &Fixture, accept_from: &str, extra: &str) -> (joint::Joint, joint::Joint) {
        let ca = std::fs::read(f.pki.ca_cert()).unwrap();
        let edge_cfg = config_of(
            f,
            "a",
            &format!("{extra}[serve]\nservices = [\"triage\"]\n[policy.share_inputs]\ntriage = [\"c\"]\n"),
        );
        let cloud_cfg = config_of(
            f,
            "c",
            &format!("{extra}[serve]\nservices = [\"triage\"]\n[cloud]\nservices = [\"triage\"]\n{accept_from}"),
        );
        let (ed, cd) = (f.dir.path().join("edge-state"), f.dir.path().join("cloud-state"));
        std::fs::create_dir_all(&ed).unwrap();
        std::fs::create_dir_all(&cd).unwrap();
        let edge = joint::Joint::open(&edge_cfg, &ed, ca.clone(), f.revocations.clone()).unwrap();
        let cloud = joint::Joint::open(&cloud_cfg, &cd, ca, f.revocations.clone()).unwrap();
        edge.on_cloud_key(&announcement(f, &cloud)).unwrap();
        (edge, cloud)
    }

    fn announcement(f: &Fixture, cloud: &joint::Joint) -> pb::CloudKeyAnnouncement {
        let key = cloud.announcements("c").pop().unwrap();
        pb::CloudKeyAnnouncement {
            party: "c".into(),
            key: Some(key),
            certificate: der(&std::fs::read(f.pki.party_cert("c")).unwrap()),
        }
    }

    fn route() -> confide_proto::deploy::JointConfig {
        confide_proto::deploy::JointConfig {
            cloud: "c".into(),
            cloud_service: "triage".into(),
            hard_examples: confide_algorithms::hard_examples::HardExampleRule::Confidence { threshold: 0.9 },
            timeout_ms: 5000,
        }
    }

    /// Forwards one row of 3 features from a to c: the request as it leaves
    /// a, and a's pending forward (answered through `on_answer`).
    async fn forward_one(
        edge: std::sync::Arc<joint::Joint>,
    ) -> (pb::Forward, tokio::task::JoinHandle<Result<(Vec<f32>, joint::CloudVersion), String>>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let pending =
            tokio::spawn(async move { edge.forward("a", Some(tx), "triage", &route(), &[0.5, 1.0, 2.0], 3, 2).await });
        let Some(pb::PartyMessage { body: Some(pb::party_message::Body::Forward(f)) }) = rx.recv().await else {
            panic!("no forward")
        };
        (f, pending)
    }

    fn version() -> joint::CloudVersion {
        joint::CloudVersion {
            party: "c".into(),
            service: "triage".into(),
            sequence: 1,
            job_id: "j".into(),
            round: 1,
            sha256: "0a".repeat(32),
        }
    }

    /// Cloud party c's answer to `request`, sealed.
    fn answer_of(request: &pb::Forward, sealed: Vec<u8>) -> pb::ForwardAnswer {
        pb::ForwardAnswer { request_id: request.request_id, peer: "c".into(), ciphertext: sealed, error: String::new() }
    }

    /// What a cloud says of its version reaches the edge's clients: a job
    /// id that is not one (megabytes, say) or a digest that is not 64 hex
    /// digits is refused, and the edge answers alone (found by review).
    #[tokio::test]
    async fn a_clouds_answer_with_a_version_that_is_not_one_is_refused() {
        let f = fixture();
        let (edge, cloud) = edge_and_cloud(&f, "");
        let edge = std::sync::Arc::new(edge);
        for (bad, field) in [
            (joint::CloudVersion { job_id: "j".repeat(100_000), ..version() }, "version.job_id"),
            (joint::CloudVersion { sha256: "not a digest".into(), ..version() }, "version.sha256"),
            (joint::CloudVersion { sha256: "0A".repeat(32), ..version() }, "version.sha256"),
        ] {
            let (sent, pending) = forward_one(edge.clone()).await;
            let request = pb::Forward { peer: "a".into(), ..sent };
            let (_, _, reply) = cloud.open_request("c", &request).unwrap();
            let sealed = cloud.seal_answer("c", &request, reply, 2, vec![0.25, 0.75], bad).unwrap();
            edge.on_answer(answer_of(&request, sealed)).unwrap();
            let e = pending.await.unwrap().unwrap_err();
            assert!(e.contains(field) && e.len() < 300, "{}", &e[..e.len().min(300)]);
        }
        // An answer that is not one, quoting megabytes back in serde's error
        // (an unknown key, a string for a number): bounded (found by review).
        for bad in [
            format!(r#"{{"classes":2,"probabilities":[0.5,0.5],"{}":1}}"#, "x".repeat(100_000)),
            format!(r#"{{"classes":"{}","probabilities":[0.5,0.5]}}"#, "y".repeat(100_000)),
        ] {
            let (sent, pending) = forward_one(edge.clone()).await;
            let request = pb::Forward { peer: "a".into(), ..sent };
            let (_, _, reply) = cloud.open_request("c", &request).unwrap();
            let ctx = joint::context("a", "c", &request.service, &request.cloud_service, request.request_id);
            let sealed = reply.seal(&ctx, bad.as_bytes()).unwrap();
            edge.on_answer(answer_of(&request, sealed)).unwrap();
            let e = pending.await.unwrap().unwrap_err();
            assert!(e.contains("not one") && e.len() < 300, "{}", &e[..e.len().min(300)]);
        }
    }

    /// A forwarded request, or a cloud's answer, that the stream could not
    /// carry (its encoding would fail and end the stream, the party's
    /// training with it) is not sent: the edge answers the rows itself.
    /// Many hard rows of a wide model, posted by any client of the edge's
    /// endpoint, no longer cut the party off the coordinator.
    #[tokio::test]
    async fn a_forward_or_an_answer_the_stream_cannot_carry_is_not_sent() {
        let f = fixture();
        let small = "[limits]\nmax_message_bytes = 65536\nchunk_bytes = 32768\n";
        let (edge, cloud) = edge_and_cloud_with(&f, "", small);
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let wide = vec![0.5f32; 300 * 100];
        let e = edge.forward("a", Some(tx.clone()), "triage", &route(), &wide, 300, 2).await.unwrap_err();
        assert!(e.contains("100 hard rows of 300 features") && e.contains("above the 64512 the stream"), "{e}");
        assert!(rx.try_recv().is_err(), "nothing was sent");
        // The coordinator's own limit, from its welcome, counts too.
        edge.connected(32 << 10);
        let half = vec![0.5f32; 300 * 40];
        let e = edge.forward("a", Some(tx), "triage", &route(), &half, 300, 2).await.unwrap_err();
        assert!(e.contains("40 hard rows") && e.contains("above the 31744 the stream"), "{e}");
        assert!(rx.try_recv().is_err(), "nothing was sent");
        edge.connected(usize::MAX);
        // A request that fits goes; an answer that would not is refused at the cloud.
        let edge = std::sync::Arc::new(edge);
        let (sent, _pending) = forward_one(edge).await;
        let request = pb::Forward { peer: "a".into(), ..sent };
        let (_, _, reply) = cloud.open_request("c", &request).unwrap();
        let e = cloud.seal_answer("c", &request, reply, 2, vec![0.5; 20_000], version()).unwrap_err();
        assert!(e.contains("above the 64512 the stream carries"), "{e}");
    }

    /// A forward that waits for room on the coordinator stream (training's
    /// transfers share it) ends at the service's timeout like one that
    /// waits for its answer, so the request falls back to the edge's own
    /// answer instead of being held past the endpoint's timeout.
    #[tokio::test]
    async fn a_forward_waiting_for_room_on_the_stream_ends_at_its_timeout() {
        let f = fixture();
        let (edge, _cloud) = edge_and_cloud(&f, "");
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::PartyMessage::default()).await.unwrap();
        let quick = confide_proto::deploy::JointConfig { timeout_ms: 200, ..route() };
        let forward = edge.forward("a", Some(tx), "triage", &quick, &[0.5, 1.0, 2.0], 3, 2);
        let e = tokio::time::timeout(Duration::from_secs(10), forward)
            .await
            .expect("the forward ended at its timeout, not held by the full stream")
            .unwrap_err();
        assert!(e.contains("within 200 ms"), "{e}");
    }

    /// The cloud answers only what its named sender signed: a request the
    /// coordinator seals to the cloud's (public) key under a party's name,
    /// or a signed one moved to another request id, is refused; with
    /// `accept_from`, a signed request of a party not listed is too. The
    /// answer's probabilities travel at a fixed width.
    #[tokio::test]
    async fn the_cloud_answers_only_requests_their_named_sender_signed() {
        let f = fixture();
        let (edge, cloud) = edge_and_cloud(&f, "");
        let edge = std::sync::Arc::new(edge);
        let (sent, pending) = forward_one(edge.clone()).await;
        assert!(!sent.signature.is_empty() && !sent.certificate.is_empty());
        // Delivered as the coordinator does: `peer` names the sender.
        let request = pb::Forward { peer: "a".into(), ..sent };
        // The coordinator's own request, sealed to c's key, under a's name
        // and certificate, with no signature of a's.
        let cloud_key: [u8; 32] = announcement(&f, &cloud).key.unwrap().public_key.try_into().unwrap();
        let ctx = joint::context("a", "c", "triage", "triage", 77);
        let mut plain = 3u32.to_le_bytes().to_vec();
        plain.extend([0u8; 12]);
        let (sealed, _) =
            confide_crypto::sealed::seal_request(&cloud_key, &ctx, &plain, &mut rand_core::OsRng).unwrap();
        let forged = pb::Forward {
            request_id: 77,
            ephemeral: sealed.ephemeral.to_vec(),
            ciphertext: sealed.ciphertext,
            signature: request.signature.clone(),
            ..request.clone()
        };
        let e = cloud.open_request("c", &forged).map(|_| ()).unwrap_err();
        assert!(e.contains("a request a did not sign"), "{e}");
        let moved = pb::Forward { request_id: request.request_id + 1, ..request.clone() };
        assert!(cloud.open_request("c", &moved).map(|_| ()).unwrap_err().contains("did not sign"));
        let unsigned = pb::Forward { signature: Vec::new(), ..request.clone() };
        assert!(cloud.open_request("c", &unsigned).map(|_| ()).unwrap_err().contains("did not sign"));
        // Another party's certificate under a's name.
        let c_cert = der(&std::fs::read(f.pki.party_cert("c")).unwrap());
        let e = cloud
            .open_request("c", &pb::Forward { certificate: c_cert.clone(), ..request.clone() })
            .map(|_| ())
            .unwrap_err();
        assert!(e.contains("certificate for a") && e.contains("names c"), "{e}");
        // Or a's signed request handed on as another party's (c's name and
        // certificate): the context changes, and the signature with it.
        let rewritten = pb::Forward { peer: "c".into(), certificate: c_cert, ..request.clone() };
        let e = cloud.open_request("c", &rewritten).map(|_| ()).unwrap_err();
        assert!(e.contains("a request c did not sign"), "{e}");
        // The real one opens, and its answer comes back at a fixed width.
        let (rows, width, reply) = cloud.open_request("c", &request).unwrap();
        assert_eq!((rows, width), (vec![0.5, 1.0, 2.0], 3));
        let sealed = cloud.seal_answer("c", &request, reply, 2, vec![0.25, 0.75], version()).unwrap();
        let (_, _, reply) = cloud.open_request("c", &request).unwrap();
        let other = cloud.seal_answer("c", &request, reply, 2, vec![0.123_456_79, 0.876_543_2], version()).unwrap();
        assert_eq!(sealed.len(), other.len(), "the answer's length does not depend on the probabilities");
        edge.on_answer(answer_of(&request, sealed)).unwrap();
        let (probabilities, got) = pending.await.unwrap().unwrap();
        assert_eq!((probabilities, got), (vec![0.25, 0.75], version()));
        // A cloud that answers only b refuses a's signed request.
        let (_, only_b) = edge_and_cloud(&f, "accept_from = [\"b\"]\n");
        let e = only_b.open_request("c", &request).map(|_| ()).unwrap_err();
        assert!(e.contains("a is not in this party's [cloud] accept_from"), "{e}");
        // At most MAX_FORWARDS_IN_FLIGHT are answered at once, and at most
        // MAX_FORWARDS_PER_EDGE of one edge's: one edge cannot take them all.
        let mine: Vec<_> = (0..joint::MAX_FORWARDS_PER_EDGE).map(|_| cloud.forward_slot("b").unwrap()).collect();
        assert!(cloud.forward_slot("b").is_none(), "b has its share");
        let others: Vec<_> = (0..joint::MAX_FORWARDS_IN_FLIGHT - joint::MAX_FORWARDS_PER_EDGE)
            .map(|i| cloud.forward_slot(&format!("e{}", i / joint::MAX_FORWARDS_PER_EDGE)).unwrap())
            .collect();
        assert!(cloud.forward_slot("a").is_none(), "all slots taken");
        drop(mine);
        assert!(cloud.forward_slot("b").is_some(), "b's share freed");
        drop(others);
        let slots: Vec<_> = (0..joint::MAX_FORWARDS_PER_EDGE).map(|_| cloud.forward_slot("a").unwrap()).collect();
        assert!(cloud.forward_slot("a").is_none());
        drop(slots);
        assert!(cloud.forward_slot("a").is_some());
    }

    /// A cloud key announced again is taken, and so is a newer one; an older
    /// one (a replaced key, replayed) is not, nor one made over an hour in
    /// this party's future; and a cloud revoked after its key was taken is
    /// sent nothing more.
    #[tokio::test]
    async fn an_older_cloud_key_or_a_revoked_cloud_gets_no_request() {
        use confide_crypto::secagg::protocol::IdentitySigner;
        let f = fixture();
        let (edge, cloud) = edge_and_cloud(&f, "");
        let c_id = IdentityKey::from_pem(&std::fs::read(f.pki.party_key("c")).unwrap()).unwrap();
        // c's announcement of `public` made at `made`, signed by c.
        let signed = |public: [u8; 32], made: u64| {
            let mut a = announcement(&f, &cloud);
            let key = a.key.as_mut().unwrap();
            key.public_key = public.to_vec();
            key.issued_at = made;
            key.signature =
                c_id.sign(&confide_crypto::sealed::cloud_key_transcript("c", "triage", &public, made)).unwrap();
            a
        };
        let held = announcement(&f, &cloud);
        let made = held.key.as_ref().unwrap().issued_at;
        edge.on_cloud_key(&held).unwrap();
        // The same key, announced on each connection, carries its making time.
        assert_eq!(announcement(&f, &cloud).key.unwrap().issued_at, made);
        let newer = confide_crypto::sealed::CloudSecret::generate(&mut rand_core::OsRng).public();
        edge.on_cloud_key(&signed(newer, made + 10)).unwrap();
        let e = edge.on_cloud_key(&held).unwrap_err();
        assert!(e.contains("not newer than the one held"), "{e}");
        // Another key at the same time is not taken either.
        let other = confide_crypto::sealed::CloudSecret::generate(&mut rand_core::OsRng).public();
        assert!(edge.on_cloud_key(&signed(other, made + 10)).unwrap_err().contains("not newer"));
        // The same key again is.
        edge.on_cloud_key(&signed(newer, made + 10)).unwrap();
        let now = crate::audit::unix_now_ms() / 1000;
        let e = edge.on_cloud_key(&signed(newer, now + 2 * 3600)).unwrap_err();
        assert!(e.contains("over an hour after this party's clock"), "{e}");
        // Back to c's real key (made later than these), for what follows.
        let real: [u8; 32] = held.key.as_ref().unwrap().public_key.clone().try_into().unwrap();
        edge.on_cloud_key(&signed(real, made + 20)).unwrap();
        // Revoked after its key was taken.
        let serial =
            confide_crypto::revocation::certificate_serial(&der(&std::fs::read(f.pki.party_cert("c")).unwrap()))
                .unwrap();
        let list = f.pki.load_ca().unwrap().revoke(&Revocations::empty(), &serial).unwrap();
        f.revocations.write().unwrap().update(list).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let e = edge.forward("a", Some(tx), "triage", &route(), &[0.5, 1.0, 2.0], 3, 2).await.unwrap_err();
        assert!(e.contains("c's certificate no longer checks") && e.contains("revoked"), "{e}");
        assert!(rx.try_recv().is_err(), "nothing sent");
        let (tx, _rx) = tokio::sync::mpsc::channel(4);
        let e = edge.forward("a", Some(tx), "triage", &route(), &[0.5, 1.0, 2.0], 3, 2).await.unwrap_err();
        assert!(e.contains("no verified key of c"), "dropped: {e}");
    }

    /// The endpoint refuses a request for another host name (a page that
    /// rebound its own name to the endpoint) and a prediction not sent as
    /// JSON (what a web page elsewhere could post without a preflight),
    /// closes a connection that moves no byte for its idle timeout, ends a
    /// request whose head or whole drips in longer than its timeouts, and
    /// holds at most its limit of connections: another waits until one
    /// closes.
    #[tokio::test]
    async fn the_endpoint_bounds_its_connections_and_takes_json_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let idle = Duration::from_millis(300);
        let bounds = http::Bounds {
            connections: 2,
            idle,
            header: Duration::from_millis(600),
            request: Duration::from_millis(900),
        };
        let addr = http::serve_with(reg, "127.0.0.1:0".parse().unwrap(), bounds).await.unwrap();
        let request_for = |host: &str, content_type: &str| {
            format!(
                "POST /v1/services/triage/predict HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\n\
                 content-length: 2\r\n\r\n{{}}"
            )
        };
        let here = format!("127.0.0.1:{}", addr.port());
        let request = |content_type: &str| request_for(&here, content_type);
        let answer = |mut c: tokio::net::TcpStream| async move {
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.expect("an answer").unwrap();
            (String::from_utf8_lossy(&buf[..n]).into_owned(), c)
        };
        // Another host name (DNS rebinding), with or without a port, or an
        // empty one.
        for host in
            ["attacker.example:".to_owned() + &addr.port().to_string(), "attacker.example".into(), String::new()]
        {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(request_for(&host, "application/json").as_bytes()).await.unwrap();
            let (text, _) = answer(c).await;
            assert!(text.starts_with("HTTP/1.1 421") && text.contains("allow_hosts"), "{host}: {text}");
        }
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request("text/plain").as_bytes()).await.unwrap();
        let (text, c) = answer(c).await;
        assert!(text.starts_with("HTTP/1.1 415") && text.contains("application/json"), "{text}");
        drop(c);
        // No Host at all (an HTTP/1.0 health check; no browser) is
        // answered, as is another port or none on an allowed name.
        for head in ["GET /healthz HTTP/1.0\r\n\r\n", "GET /healthz HTTP/1.0\r\nhost: localhost\r\n\r\n"] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(head.as_bytes()).await.unwrap();
            let (text, _) = answer(c).await;
            assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{head}: {text}");
        }
        // JSON gets past that check (503: nothing deployed yet).
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request("application/json; charset=utf-8").as_bytes()).await.unwrap();
        let (text, _keep) = answer(c).await;
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        // Two connections held (one kept alive above, one silent): a third
        // is not served until the idle timeout frees one.
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        third.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {here}\r\n\r\n").as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(idle / 3, third.read(&mut buf)).await;
        assert!(early.is_err(), "answered while two connections were held: {early:?}");
        let (text, _) = answer(third).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        // The silent one was closed by the server.
        let mut silent = silent;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await.expect("closed");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        drop(silent);
        // Then a byte every 100 ms (never idle): a head that takes longer
        // than its timeout ends the connection, a body that does gets a 503.
        let drip = |head: String| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let start = tokio::time::Instant::now();
            let mut buf = vec![0u8; 4096];
            c.write_all(head.as_bytes()).await.unwrap();
            loop {
                if c.write_all(b" ").await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await {
                    Ok(Ok(n)) => return (String::from_utf8_lossy(&buf[..n]).into_owned(), start.elapsed()),
                    Ok(Err(_)) => break,
                    Err(_) => assert!(start.elapsed() < Duration::from_secs(10), "still reading after 10 s"),
                }
            }
            (String::new(), start.elapsed())
        };
        let (text, took) = drip(format!("GET /healthz HTTP/1.1\r\nhost: {here}\r\nx-drip: ")).await;
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(took >= Duration::from_millis(500), "{took:?}");
        let head = format!(
            "POST /v1/services/triage/predict HTTP/1.1\r\nhost: {here}\r\ncontent-type: application/json\r\n\
             content-length: 100000\r\n\r\n"
        );
        let (text, took) = drip(head).await;
        assert!(text.starts_with("HTTP/1.1 503") && text.contains("within"), "{text}");
        assert!(took >= Duration::from_millis(800), "{took:?}");
    }

    #[test]
    fn a_revoked_administrator_cannot_deploy() {
        let f = fixture();
        let v1 = model_bytes(1);
        let d1 = admin_signed(&f, record(1, &v1, LOGREG));
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let list = f.pki.revoke_admin(confide_crypto::pki::ADMIN_NAME, None).unwrap();
        f.revocations.write().unwrap().update(list).unwrap();
        let e = reg.offer(&d1).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        // After `confide certs issue --admin`: what the old certificate
        // signed stays refused; the new one deploys.
        f.pki.reissue_admin().unwrap();
        let e = reg.offer(&d1).unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        let v2 = model_bytes(2);
        assert!(reg.offer(&admin_signed(&f, record(2, &v2, LOGREG))).unwrap().is_some(), "the new certificate deploys");
    }

    /// The window of a swap from a version without a cloud tier to one
    /// with: the request read the old version (no rows kept for a cloud)
    /// and the new one answered. Its hard rows are flagged, with the reason,
    /// not counted as the edge's own answers (found by review).
    #[tokio::test]
    async fn a_request_answered_across_a_swap_to_a_cloud_tier_flags_its_hard_rows() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let (v1, v2) = (model_bytes(1), model_bytes(2));
        deliver(&reg, &admin_signed(&f, record(1, &v1, LOGREG)), &v1).unwrap();
        let old = reg.current("triage").unwrap();
        let mut joint = record(2, &v2, LOGREG);
        joint.joint = Some(confide_proto::deploy::JointConfig {
            hard_examples: confide_algorithms::hard_examples::HardExampleRule::Confidence { threshold: 1.0 },
            ..route()
        });
        deliver(&reg, &admin_signed(&f, joint), &v2).unwrap();
        // As a request that read `current` just before the swap sees it.
        *reg.services["triage"].current.write().unwrap() = Some(old);
        let a = reg.answer("triage", vec![0.5, 1.0, -1.0], 1, 3).await.unwrap();
        assert_eq!(a.served.deployment.record.sequence, 2);
        assert_eq!(a.sources, vec![RowSource::EdgeHard]);
        assert!(a.fallback.as_deref().is_some_and(|f| f.contains("swapped")), "{:?}", a.fallback);
    }

    #[test]
    fn requests_in_flight_during_swaps_all_succeed_with_one_version_or_the_other() {
        let f = fixture();
        let reg = Registry::open(&f.config, f.revocations.clone()).unwrap().unwrap();
        let versions: Vec<Vec<u8>> = (1..=4).map(model_bytes).collect();
        deliver(&reg, &admin_signed(&f, record(1, &versions[0], LOGREG)), &versions[0]).unwrap();
        // Versions 2 to 4 are swapped in from another thread while
        // requests keep arriving.
        let swapper = {
            let (reg, versions) = (reg.clone(), versions.clone());
            let signed: Vec<_> = (1..4).map(|i| admin_signed(&f, record(i as u64 + 1, &versions[i], LOGREG))).collect();
            std::thread::spawn(move || {
                for (d, v) in signed.iter().zip(&versions[1..]) {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    deliver(&reg, d, v).unwrap();
                }
            })
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let reg2 = reg.clone();
        let answers = rt.block_on(async move {
            let mut out = Vec::new();
            for wave in 0..20 {
                let tasks: Vec<_> = (0..20)
                    .map(|i| {
                        let reg = reg2.clone();
                        tokio::spawn(async move {
                            let rows = vec![(wave * 20 + i) as f32 / 100.0, 1.0, -1.0];
                            reg.predict("triage", rows, 1, 3).await.map(|p| p.served.deployment.record.sequence)
                        })
                    })
                    .collect();
                for t in tasks {
                    out.push(t.await.unwrap());
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            out
        });
        swapper.join().unwrap();
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        assert_eq!(reg.current("triage").unwrap().deployment.record.sequence, 4);
    }
}
