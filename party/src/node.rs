//! The party's driver: the connection to the coordinator (tokio), and one
//! thread per job running its [`PartySession`] (trainers are `Send` but not
//! `Sync`, and training is blocking work).
//!
//! The connection loop only decodes and routes: offers go through the
//! policy ([`crate::policy::consider`]), tasks are reassembled from their
//! chunks, converted to typed [`Task`]s and handed to their job's thread;
//! the session decides everything else.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use confide_crypto::aggregation::PartyIdentity;
use confide_crypto::identity::{CertVerifier, IdentityKey, SharedRevocations};
use confide_crypto::revocation::Revocations;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::Task;
use confide_proto::net::{CoordinatorCertificate, connect_checking_revocations};
use confide_proto::pb::party_service_client::PartyServiceClient;
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_proto::transfer::{self, Bulk, Incoming};
use confide_proto::{Limits, VERSION};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::Error;
use crate::config::PartyConfig;
use crate::plugins::{JobContext, PartyPlugins};
use crate::session::{Millis, PartyInput, PartyOutput, PartySession};
use crate::telemetry::{PartyMetrics, SharedMetrics};
use crate::trainers::{BuiltinTrainers, TrainerFactory};

/// Traffic counters (for logs and benchmarks).
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Encoded bytes sent to the coordinator.
    pub bytes_sent: AtomicU64,
    /// Encoded bytes received from the coordinator.
    pub bytes_received: AtomicU64,
    /// Tasks completed.
    pub tasks_done: AtomicU64,
}

/// A party node.
pub struct PartyNode {
    config: PartyConfig,
    plugins: PartyPlugins,
    trainers: Arc<dyn TrainerFactory>,
    stats: Arc<NodeStats>,
    /// The newest revocation list accepted, shared with every job's
    /// certificate verifier.
    revocations: SharedRevocations,
    /// The privacy ledger (or why it could not be read: then every job
    /// offer is refused with that reason).
    ledger: Result<Arc<crate::ledger::Ledger>, String>,
    /// The services this party serves (set by [`PartyNode::start_serving`]).
    serving: std::sync::OnceLock<Arc<crate::serving::Registry>>,
    /// Incremental pipelines' watched data sets (or why their state could
    /// not be read: then every pipeline job is refused with that reason).
    watches: Result<Arc<crate::watch::Watches>, String>,
    /// Its Prometheus metrics (served when `[metrics] listen` is set).
    metrics: SharedMetrics,
    metrics_server: std::sync::OnceLock<confide_proto::telemetry::MetricsServer>,
    /// One acceptance at a time, node-wide, including the blocking work of
    /// one whose connection ended (see [`PartyNode::accept`]).
    acceptance_slot: Arc<tokio::sync::Semaphore>,
    /// What this party released of each job (runs taken, sums decrypted),
    /// kept across the job's sessions (a re-offered job finds it).
    released: Arc<confide_crypto::aggregation::Released>,
    /// The job workers (threads) alive, by job: what `policy.max_jobs`
    /// bounds, since a closed or replaced job's worker lives on until its
    /// current task ends.
    workers: LiveWorkers,
}

/// Live job workers by job id, across the node's connections.
#[derive(Clone, Default)]
struct LiveWorkers(Arc<std::sync::Mutex<HashMap<String, usize>>>);

/// Counts its worker alive until dropped (when the worker's thread ends).
struct WorkerAlive(LiveWorkers, String);

impl LiveWorkers {
    fn enter(&self, job: &str) -> WorkerAlive {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(job.to_owned()).or_default() += 1;
        WorkerAlive(self.clone(), job.to_owned())
    }

    /// The jobs with live workers, and how many each.
    fn live(&self) -> HashMap<String, usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        let mut live = (self.0).0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = live.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.1);
            }
        }
    }
}

/// Workers of one job alive at once: a re-offered job's new session beside
/// the old one's, which ends with its current task.
const MAX_WORKERS_PER_JOB: usize = 2;

/// How long an offer waits for ending workers to make room before it is
/// refused (see `policy.max_jobs`).
const WORKERS_WAIT: Duration = Duration::from_secs(10);

struct Outbox {
    tx: mpsc::Sender<pb::PartyMessage>,
    stats: Arc<NodeStats>,
    /// Held while one result's header and chunks go out: the jobs' workers
    /// share the stream, and the coordinator reassembles one transfer at a
    /// time, so two jobs' chunks must not interleave.
    transfer: std::sync::Mutex<()>,
}

impl Outbox {
    fn send_blocking(&self, body: party_message::Body) -> bool {
        let msg = pb::PartyMessage { body: Some(body) };
        self.stats.bytes_sent.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
        self.tx.blocking_send(msg).is_ok()
    }

    async fn send(&self, body: party_message::Body) -> bool {
        let msg = pb::PartyMessage { body: Some(body) };
        self.stats.bytes_sent.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
        self.tx.send(msg).await.is_ok()
    }
}

/// An offer's acceptance under way: the offer, when it came, and the
/// session or the reason for refusing.
type Accepting<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (pb::JobOffer, tokio::time::Instant, Result<(PartySession, WorkerAlive), String>),
            > + Send
            + 'a,
    >,
>;

/// Offers in flight at once (waiting, being accepted, or accepted with
/// their answers held): more are refused at once.
const MAX_OFFERS_IN_FLIGHT: usize = 64;

/// The same under an answer floor. Acceptances run one after another, so
/// offers that arrive together answer no sooner than their acceptances
/// together take: a floor hides them while this many take less than it.
/// An offer counts from its arrival until its answer is sent, at its floor
/// while the acceptances fit within it, so whether the limit is reached
/// depends on when the offers came alone.
const MAX_OFFERS_UNDER_FLOOR: usize = 8;

/// How long an acceptance waits for the node's acceptance slot before it
/// warns that whatever holds it has not ended.
const SLOT_WARNING: Duration = Duration::from_secs(60);

/// Tasks kept, in all, for jobs whose offers are in flight; more are
/// refused (a coordinator sends one stage's task of a job at a time).
const MAX_WAITING: usize = 16;

/// Most characters of a close's reason kept, passed on and logged.
const MAX_CLOSE_REASON_CHARS: usize = 1024;

/// A message for a job whose offer is in flight, kept for the newest such
/// offer when it came (its serial): a close sent before a re-offer is for
/// the session before it.
enum Waiting {
    Task(pb::Task, Option<Bulk>),
    /// The close's reason, and how the job ended (if it did).
    Closed(String, Option<String>),
}

/// What came for a job meanwhile, by job, each with its offer's serial.
type Kept = HashMap<String, Vec<(u64, Waiting)>>;

/// An acceptance that ended before its offer's answer may go: the answer,
/// and the session, wait in the message loop until `at`. The job becomes
/// visible (a worker to route its tasks to, its answer) only then, so that
/// nothing the coordinator can ask tells when the acceptance ended.
struct Held {
    at: tokio::time::Instant,
    serial: u64,
    offer: pb::JobOffer,
    accepted: Result<(PartySession, WorkerAlive), String>,
}

/// A connection's offers between their arrival and their answers.
/// Acceptances run one at a time beside the message loop, not in it:
/// accepting reads and sets up the data set's rows, and a loop busy with it
/// would answer whatever the coordinator sent right behind the offer (a task
/// of another job) late by that long, telling the data set's size past any
/// floor.
struct Offers<'a> {
    /// Waiting to be accepted: each with its serial and when it came.
    queued: VecDeque<(u64, pb::JobOffer, tokio::time::Instant)>,
    /// Being accepted: its serial, its job, and the acceptance.
    accepting: Option<(u64, String, Accepting<'a>)>,
    /// Accepted or refused, each answer held until `at` (in order of `at`:
    /// offers are taken in order of arrival, one at a time), then sent in
    /// that order.
    held: VecDeque<Held>,
    /// The next offer's serial.
    next_serial: u64,
    /// The node's acceptance slot, under which held sessions are freed.
    slot: Arc<tokio::sync::Semaphore>,
}

impl Drop for Offers<'_> {
    /// However the connection ends: sessions whose answers were held hold
    /// their rows, freed on a blocking thread under the acceptance slot, so
    /// that how long freeing takes delays no reconnect.
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        if held.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let slot = self.slot.clone();
            runtime.spawn(async move {
                let slot = slot.acquire_owned().await;
                tokio::task::spawn_blocking(move || drop((held, slot)));
            });
        }
    }
}

impl Offers<'_> {
    fn in_flight(&self) -> usize {
        self.queued.len() + usize::from(self.accepting.is_some()) + self.held.len()
    }

    /// Whether offer `serial` is in flight.
    fn in_flight_serial(&self, serial: u64) -> bool {
        self.queued.iter().any(|(n, _, _)| *n == serial)
            || self.accepting.as_ref().is_some_and(|(n, _, _)| *n == serial)
            || self.held.iter().any(|h| h.serial == serial)
    }

    /// The serial of the newest offer of `job_id` in flight, if any.
    fn newest(&self, job_id: &str) -> Option<u64> {
        let queued = self.queued.iter().filter(|(_, o, _)| o.job_id == job_id).map(|(n, _, _)| *n);
        let accepting = self.accepting.iter().filter(|(_, id, _)| id == job_id).map(|(n, _, _)| *n);
        let held = self.held.iter().filter(|h| h.offer.job_id == job_id).map(|h| h.serial);
        queued.chain(accepting).chain(held).max()
    }
}

/// Why an offer is refused on arrival, from the message alone (no data set
/// is read, so the refusal goes at once): a malformed job id, a spec over
/// the limit, a data set this party does not have, or too many offers in
/// flight. The answer echoes no more of the id than a valid one holds.
fn refuse_on_arrival(
    offer: &pb::JobOffer,
    cfg: &PartyConfig,
    in_flight: usize,
    floor: Option<Duration>,
) -> Option<pb::JobAnswer> {
    let limit = if floor.is_some() { MAX_OFFERS_UNDER_FLOOR } else { MAX_OFFERS_IN_FLIGHT };
    let reason = if let Err(e) = confide_proto::validate_job_id(&offer.job_id) {
        e
    } else if offer.spec_toml.len() > cfg.limits.max_spec_bytes {
        format!("spec_toml: {} bytes; the limit is {}", offer.spec_toml.len(), cfg.limits.max_spec_bytes)
    } else if !cfg.datasets.contains_key(&offer.dataset) {
        format!("no data set named {:?} at this party", echoed(&offer.dataset))
    } else if in_flight >= limit {
        let under = if floor.is_some() { " under policy.min_answer_after_secs" } else { "" };
        format!("{limit} offers are already in flight{under}; offer the job again later")
    } else {
        return None;
    };
    Some(pb::JobAnswer { job_id: echoed(&offer.job_id), accepted: false, reason })
}

/// Routes a task to its job's worker or, while the job's offer is in flight
/// (a coordinator re-offers a job on reconnect and goes on with its
/// stages), keeps it until the offer is answered.
/// (`in_flight`: [`Offers::newest`] of the task's job, decided by the
/// caller, since `Offers` holds futures that are not Sync.)
async fn deliver(
    jobs: &HashMap<String, JobInbox>,
    waiting: &mut Kept,
    in_flight: Option<u64>,
    outbox: &Outbox,
    task: pb::Task,
    bulk: Option<Bulk>,
) {
    let Some(serial) = in_flight else {
        return route(jobs, outbox, task, bulk).await;
    };
    let kept = waiting.values().flatten().filter(|(_, w)| matches!(w, Waiting::Task(..))).count();
    if kept < MAX_WAITING {
        waiting.entry(task.job_id.clone()).or_default().push((serial, Waiting::Task(task, bulk)));
    } else {
        let reason = format!("{MAX_WAITING} tasks already wait for their jobs' offers to be answered");
        let failed = pb::TaskFailed { job_id: echoed(&task.job_id), task_id: task.task_id, reason };
        outbox.send(party_message::Body::Failed(failed)).await;
    }
}

/// At most [`confide_proto::MAX_JOB_ID_LEN`] bytes of `text` (a job id
/// from the wire, echoed back or logged): a longer one is no job's.
fn echoed(text: &str) -> String {
    let mut end = text.len().min(confide_proto::MAX_JOB_ID_LEN);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The stage a task names (for fault injection, before its chunks arrive).
fn stage_of(task: &pb::Task) -> &str {
    use pb::task::Body;
    match &task.body {
        Some(Body::Setup(_)) => "setup",
        Some(Body::Fit(_)) => "fit",
        Some(Body::Evaluate(_)) => "evaluate",
        Some(Body::SecureSum(s)) => {
            if s.of == pb::secure_sum_task::Of::FeatureStats as i32 {
                "setup"
            } else {
                "evaluate"
            }
        }
        Some(Body::Aggregation(s) | Body::Extension(s)) => &s.stage,
        None => "unspecified",
    }
}

impl PartyNode {
    /// A node training with `factory` and the built-in protocols and kinds.
    pub fn new(config: PartyConfig, factory: Arc<dyn TrainerFactory>) -> PartyNode {
        PartyNode::with_plugins(config, PartyPlugins::new().trainers(factory))
    }

    /// Why the privacy ledger could not be opened (`None`: it is open, and
    /// its lock held, for the node's lifetime). `confide-party run` stops
    /// on it: a party must not forget what it spent, and nothing else
    /// (`confide-party pipelines --forget`) may edit its state meanwhile.
    pub fn ledger_error(&self) -> Option<&str> {
        self.ledger.as_ref().err().map(String::as_str)
    }

    /// The party's configuration.
    pub fn config(&self) -> &PartyConfig {
        &self.config
    }

    /// Why the pipelines' state (batch marks, hard examples) could not be
    /// opened, if it could not: the party stops at start, as for the
    /// ledger, rather than run without marks and drop every hard example
    /// unsaid (found by review).
    pub fn watches_error(&self) -> Option<&str> {
        self.watches.as_ref().err().map(String::as_str)
    }

    /// A node with a build's own trainers, protocols and job kinds.
    pub fn with_plugins(config: PartyConfig, plugins: PartyPlugins) -> PartyNode {
        let trainers =
            plugins.trainer_factory().cloned().unwrap_or_else(|| Arc::new(BuiltinTrainers::for_config(&config)));
        let ledger = crate::ledger::Ledger::open(&config.ledger_path());
        if let Ok(l) = &ledger {
            let rows: Vec<(&str, std::path::PathBuf)> =
                config.datasets.iter().map(|(n, d)| (n.as_str(), crate::config::resolved_path(&d.path))).collect();
            let rows: Vec<(&str, &std::path::Path)> = rows.iter().map(|(n, p)| (*n, p.as_path())).collect();
            if let Err(e) = l.record_paths(&rows) {
                warn!("privacy ledger: could not record the data sets' paths: {e}");
            }
        }
        let watches = crate::watch::Watches::of_config(&config).map(Arc::new);
        PartyNode {
            config,
            plugins,
            trainers,
            stats: Arc::new(NodeStats::default()),
            revocations: Arc::new(RwLock::new(Revocations::empty())),
            ledger,
            serving: std::sync::OnceLock::new(),
            watches,
            // Fixed, distinct, valid names: registering them cannot fail
            // (`telemetry::tests` registers the same set).
            metrics: Arc::new(PartyMetrics::new().unwrap_or_else(|e| panic!("party metrics: {e}"))),
            metrics_server: std::sync::OnceLock::new(),
            acceptance_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            released: Default::default(),
            workers: LiveWorkers::default(),
        }
    }

    /// Its Prometheus metrics.
    pub fn metrics(&self) -> SharedMetrics {
        self.metrics.clone()
    }

    /// Sets the gauges read off state, before a scrape.
    fn refresh_metrics(&self) {
        self.metrics
            .bytes(self.stats.bytes_sent.load(Ordering::Relaxed), self.stats.bytes_received.load(Ordering::Relaxed));
        if let Ok(ledger) = &self.ledger {
            let spent: Vec<(String, f64, f64)> =
                ledger.snapshot().datasets.iter().map(|(n, d)| (n.clone(), d.epsilon(), d.delta())).collect();
            let budgets: Vec<(String, f64)> = match self.config.policy.max_epsilon {
                Some(max) => self.config.datasets.keys().map(|n| (n.clone(), max)).collect(),
                None => Vec::new(),
            };
            self.metrics.ledger(&spent, &budgets);
        }
    }

    /// Serves `/metrics` when `[metrics] listen` is set; returns its address.
    /// Called by [`PartyNode::run`]; a second call does nothing.
    pub async fn start_metrics(self: &Arc<Self>) -> Result<Option<std::net::SocketAddr>, Error> {
        let Some(listen) = self.config.metrics.listen else { return Ok(None) };
        if let Some(s) = self.metrics_server.get() {
            return Ok(Some(s.local_addr));
        }
        let node = Arc::downgrade(self);
        let refresh = Arc::new(move || {
            if let Some(n) = node.upgrade() {
                n.refresh_metrics();
            }
        });
        let server = confide_proto::telemetry::serve(
            listen,
            self.config.metrics.allow_hosts.clone(),
            self.metrics.registry.clone(),
            refresh,
        )
        .await
        .map_err(Error::Config)?;
        let addr = server.local_addr;
        info!(%addr, "metrics at http://{addr}/metrics");
        let _ = self.metrics_server.set(server);
        Ok(Some(addr))
    }

    /// Its traffic counters.
    pub fn stats(&self) -> Arc<NodeStats> {
        self.stats.clone()
    }

    /// Starts serving `[serve] services`: loads and verifies the kept
    /// deployments and binds `[serve] listen`. Returns the endpoint's
    /// address, if it has one. Called once, before [`PartyNode::run`] (which
    /// calls it if it was not); a second call does nothing.
    pub async fn start_serving(&self) -> Result<Option<std::net::SocketAddr>, Error> {
        if self.serving.get().is_some() {
            return Ok(None);
        }
        let Some(registry) = self.open_serving()? else { return Ok(None) };
        match self.config.serve.listen {
            Some(addr) => {
                let bound = crate::serving::http::serve(registry, addr).await.map_err(Error::Config)?;
                info!(%bound, "prediction endpoint listening");
                Ok(Some(bound))
            }
            None => Ok(None),
        }
    }

    /// Loads the services' kept deployments (verified against the newest
    /// revocation list this party holds) without listening: what `confide-party
    /// predict` answers from. `None` when the party serves nothing.
    pub fn open_serving(&self) -> Result<Option<Arc<crate::serving::Registry>>, Error> {
        if let Some(r) = self.serving.get() {
            return Ok(Some(r.clone()));
        }
        if self.config.serve.services.is_empty() {
            return Ok(None);
        }
        self.load_kept_revocations().map_err(Error::Config)?;
        let registry = crate::serving::Registry::open(&self.config, self.revocations.clone()).map_err(Error::Config)?;
        if let (Some(r), Ok(w)) = (&registry, &self.watches) {
            r.keep_hard_examples_in(w.clone());
        }
        if let Some(r) = &registry {
            r.count_in(self.metrics.clone());
        }
        Ok(registry.map(|r| self.serving.get_or_init(|| r).clone()))
    }

    /// The services this party serves, once started.
    pub fn serving(&self) -> Option<Arc<crate::serving::Registry>> {
        self.serving.get().cloned()
    }

    /// Connects, serves, and reconnects with exponential back-off forever.
    pub async fn run(&self) {
        if let Err(e) = self.start_serving().await {
            warn!("not serving models: {e}");
        }
        let (initial, max) = (self.config.reconnect.initial_ms, self.config.reconnect.max_ms);
        let mut delay = initial;
        loop {
            let served = self.serve_once().await;
            self.metrics.set_connected(false);
            if let Some(registry) = self.serving.get() {
                registry.disconnected();
            }
            let wait = match &served {
                Ok(true) => {
                    info!("the coordinator closed the stream; reconnecting");
                    delay = initial;
                    delay
                }
                Ok(false) => {
                    warn!("the coordinator closed the stream before welcoming us");
                    delay
                }
                Err(e) => {
                    let asked = match e {
                        Error::Throttled(_, asked) => Some(*asked),
                        _ => None,
                    };
                    let wait = reconnect_wait(delay, asked);
                    warn!("{e}; retrying in {wait} ms");
                    wait
                }
            };
            // Jitter spreads reconnects after a coordinator restart.
            let jitter = rand::random::<u64>() % (wait / 4 + 1);
            tokio::time::sleep(Duration::from_millis(wait + jitter)).await;
            delay = (delay * 2).min(max);
        }
    }

    /// The revocation list in force at this party.
    pub fn revocation_list(&self) -> Revocations {
        self.revocations.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Accepts a revocation list (DER or PEM) from `source` if the CA signed
    /// it and it is not older than the newest seen; a newer one is kept on
    /// disk. An older one is the coordinator's fault and is refused.
    fn accept_revocations(&self, bytes: &[u8], source: &str) -> Result<(), String> {
        if bytes.is_empty() {
            return Ok(());
        }
        let ca = std::fs::read(&self.config.ca).map_err(|e| format!("{}: {e}", self.config.ca.display()))?;
        let keep_at = self.config.revocation_list_path();
        if let Some(version) = confide_proto::net::adopt_revocations(&self.revocations, bytes, &ca, source, &keep_at)? {
            info!(version, "accepted revocation list version {version}");
        }
        Ok(())
    }

    /// Ends the connection when the list now in force revokes the
    /// certificate the coordinator showed (a list can arrive mid-connection).
    fn refuse_revoked_coordinator(&self, shown: &CoordinatorCertificate) -> Result<(), Error> {
        let shown = shown.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(cert) = shown else { return Ok(()) };
        let list = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        match list.check("the coordinator", &cert) {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::PeerMisbehaved(format!(
                "its certificate is revoked (revocation list version {})",
                list.version()
            ))),
        }
    }

    /// Loads the newest list this party has kept (none before the first
    /// revocation), so that after a restart a coordinator cannot roll it back.
    fn load_kept_revocations(&self) -> Result<(), String> {
        let kept = self.config.revocation_list_path();
        match std::fs::read(&kept) {
            Ok(bytes) => self.accept_revocations(&bytes, &kept.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", kept.display())),
        }
    }

    /// One connection: returns whether the coordinator welcomed us.
    async fn serve_once(&self) -> Result<bool, Error> {
        let cfg = &self.config;
        self.load_kept_revocations().map_err(Error::Config)?;
        let id = cfg.client_identity();
        // The handshake refuses a coordinator certificate that the list
        // this party holds revokes.
        let (channel, coordinator_cert) = connect_checking_revocations(&id, Some(self.revocations.clone()))
            .await
            .map_err(|e| Error::Transport(e.to_string()))?;
        let max = cfg.limits.max_message_bytes;
        let mut client = PartyServiceClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max);
        let (tx, rx) = mpsc::channel::<pb::PartyMessage>(32);
        let outbox = Arc::new(Outbox { tx, stats: self.stats.clone(), transfer: std::sync::Mutex::new(()) });
        let hello = hello(cfg, &coordinator_cert).map_err(Error::Config)?;
        outbox.send(party_message::Body::Hello(hello)).await;
        let mut inbound = client.join(ReceiverStream::new(rx)).await.map_err(join_refused)?.into_inner();
        let mut welcomed = false;
        // The name protocols sign under, the ledger and the logs use: the
        // certificate's, never the coordinator's word for it.
        let me = own_identity(cfg).map_err(Error::Config)?.name;
        let mut jobs: HashMap<String, JobInbox> = HashMap::new();
        // A task whose chunks are coming, with the newest offer of its job
        // in flight when its header came (the session it is for).
        let mut pending: Option<(pb::Task, Incoming, Option<u64>)> = None;
        let mut offers = Offers {
            queued: VecDeque::new(),
            accepting: None,
            held: VecDeque::new(),
            next_serial: 0,
            slot: self.acceptance_slot.clone(),
        };
        // Tasks and closes for a job whose offer is in flight (a coordinator
        // re-offers a job on reconnect and goes on with its stages):
        // delivered, in order, once it is answered.
        let mut waiting = Kept::new();
        // The hospital's floor on offers' answers, counted from each offer's
        // arrival.
        let floor = cfg.policy.min_answer_after_secs.and_then(|s| Duration::try_from_secs_f64(s).ok());
        let floor = floor.filter(|f| !f.is_zero());
        loop {
            if offers.accepting.is_none()
                && let Some((serial, offer, offered)) = offers.queued.pop_front()
            {
                let me = me.clone();
                let job_id = offer.job_id.clone();
                // Refused, at the floor like any answer, when the party
                // already runs its most jobs: each holds a thread, a model
                // and an inbox, and only the hospital bounds how many.
                // Counted by live workers, node-wide (a job closed or
                // replaced while it trains still holds its worker), an
                // accepted answer not sent yet holding its worker's place.
                jobs.retain(|_, j| j.running());
                // Workers this connection runs or will: any other live one
                // is ending (its job closed or replaced, or its connection
                // gone), and only then is an offer worth holding back.
                let mut active: HashMap<String, usize> = jobs.keys().map(|k| (k.clone(), 1)).collect();
                for h in offers.held.iter().filter(|h| h.accepted.is_ok()) {
                    *active.entry(h.offer.job_id.clone()).or_default() += 1;
                }
                let (workers, max_jobs, job) = (self.workers.clone(), cfg.policy.max_jobs, job_id.clone());
                let busy = move || {
                    let live = workers.live();
                    let others = live.keys().filter(|j| **j != job).count();
                    let same = live.get(&job).copied().unwrap_or(0);
                    let ending = live.iter().any(|(j, n)| *n > active.get(j).copied().unwrap_or(0));
                    let why = if others >= max_jobs {
                        format!("this party already runs {others} jobs (policy.max_jobs = {max_jobs})")
                    } else if same >= MAX_WORKERS_PER_JOB {
                        format!("{same} sessions of this job still run here")
                    } else {
                        return None;
                    };
                    Some((why, ending))
                };
                let workers = self.workers.clone();
                offers.accepting = Some((
                    serial,
                    job_id,
                    Box::pin(async move {
                        // A worker that is ending is waited for a while: a
                        // refusal is for good at the coordinator.
                        let give_up = tokio::time::Instant::now() + WORKERS_WAIT;
                        let accepted = loop {
                            match busy() {
                                None => break self.accept(&offer, &me).await,
                                Some((why, ending)) if !ending || tokio::time::Instant::now() >= give_up => {
                                    break Err(why);
                                }
                                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                            }
                        };
                        // Its worker counts from here, its answer held or not.
                        let accepted = accepted.map(|session| (session, workers.enter(&offer.job_id)));
                        (offer, offered, accepted)
                    }),
                ));
            }
            let next_answer = offers.held.front().map(|h| h.at);
            let received = tokio::select! {
                received = inbound.message() => received,
                Some((offer, offered, accepted)) = async {
                    match offers.accepting.as_mut() {
                        Some((_, _, f)) => Some(f.await),
                        None => None,
                    }
                }, if offers.accepting.is_some() => {
                    // Answered from `held` in any case (at once without a
                    // floor), so that answers go in the order offers came.
                    if let Some((serial, ..)) = offers.accepting.take() {
                        let at = floor.map_or_else(tokio::time::Instant::now, |f| offered + f);
                        offers.held.push_back(Held { at, serial, offer, accepted });
                    }
                    continue;
                }
                () = async {
                    match next_answer {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if next_answer.is_some() => {
                    if let Some(Held { serial, offer, accepted, .. }) = offers.held.pop_front() {
                        self.answer((&outbox, serial), &mut jobs, &mut waiting, offer, accepted).await;
                    }
                    continue;
                }
            };
            let msg = match received {
                Ok(Some(m)) => m,
                ended => {
                    // An acceptance under way, and the answers held, are
                    // dropped with the connection, not awaited (a reconnect
                    // that waited for the acceptance would time it). Its
                    // blocking work finishes in the background, holding the
                    // node's one acceptance slot until then (see
                    // `PartyNode::accept`). That is safe: the ledger's
                    // reservation is durable, and a re-offer reuses it.
                    // Sessions held for their floors are freed as `Offers`
                    // drops, on any return.
                    return match ended {
                        Err(s) => Err(Error::Transport(format!("stream ended: {}", s.message()))),
                        _ => Ok(welcomed),
                    };
                }
            };
            self.stats.bytes_received.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
            let Some(body) = msg.body else {
                return Err(Error::PeerMisbehaved("empty message".into()));
            };
            // The welcome comes first (it names this party and carries the
            // revocation list the coordinator's certificate is checked
            // against): nothing is taken from a stream before it.
            if !welcomed && !matches!(body, coordinator_message::Body::Welcome(_)) {
                return Err(Error::PeerMisbehaved("a message before the welcome".into()));
            }
            match body {
                coordinator_message::Body::Welcome(_) if welcomed => {
                    return Err(Error::PeerMisbehaved("a second welcome on one connection".into()));
                }
                coordinator_message::Body::Welcome(w) if w.party != me => {
                    return Err(Error::PeerMisbehaved(format!(
                        "the coordinator welcomed this party as {:?}; its certificate names it {me}",
                        echoed(&w.party)
                    )));
                }
                coordinator_message::Body::Welcome(w) => {
                    info!(party = %me, coordinator_version = %w.software_version, "connected to the coordinator");
                    welcomed = true;
                    self.metrics.set_connected(true);
                    let crl = w.revocations.map(|r| r.crl).unwrap_or_default();
                    if let Err(e) = self.accept_revocations(&crl, "the coordinator's revocation list") {
                        warn!("coordinator fault: {e}");
                    }
                    self.refuse_revoked_coordinator(&coordinator_cert)?;
                    if let Some(registry) = self.serving.get() {
                        // (The coordinator's message limit, which may be
                        // below ours; 0: not stated.)
                        let theirs = match w.max_message_bytes {
                            0 => usize::MAX,
                            n => usize::try_from(n).unwrap_or(usize::MAX),
                        };
                        for key in registry.connected(&me, outbox.tx.clone(), theirs) {
                            info!(service = %key.service, "announcing this party's cloud key");
                            outbox.send(party_message::Body::CloudKey(key)).await;
                        }
                        if cfg.reports_serving_counts() {
                            tokio::spawn(report_serving(registry.clone(), outbox.clone()));
                        }
                    }
                }
                coordinator_message::Body::Revocations(r) => {
                    if let Err(e) = self.accept_revocations(&r.crl, "the coordinator's revocation list") {
                        warn!("coordinator fault: {e}");
                    }
                    self.refuse_revoked_coordinator(&coordinator_cert)?;
                }
                coordinator_message::Body::Offer(offer) => {
                    // Refusals from the message alone go at once; an offer
                    // taken counts until its answer is sent.
                    match refuse_on_arrival(&offer, cfg, offers.in_flight(), floor) {
                        Some(answer) => {
                            warn!(job = ?answer.job_id, "refused job: {}", answer.reason);
                            self.metrics.job_offer(false);
                            outbox.send(party_message::Body::JobAnswer(answer)).await;
                        }
                        None => {
                            let serial = offers.next_serial;
                            offers.next_serial += 1;
                            offers.queued.push_back((serial, offer, tokio::time::Instant::now()));
                        }
                    }
                }
                coordinator_message::Body::Task(mut task) => {
                    if let Some(stage) = &cfg.fault.exit_on_stage
                        && stage_of(&task) == stage
                        && cfg.fault.exit_on_round.is_none_or(|r| r == task.round)
                    {
                        let job = echoed(&task.job_id);
                        warn!(job = %job, round = task.round, "fault injection: exiting on a {stage} task");
                        std::process::exit(3);
                    }
                    if pending.is_some() {
                        return Err(Error::PeerMisbehaved(
                            "a task started before the previous one's chunks ended".into(),
                        ));
                    }
                    match task.bulk.take() {
                        None => deliver(&jobs, &mut waiting, offers.newest(&task.job_id), &outbox, task, None).await,
                        Some(h) => {
                            // A task of a job this party neither runs nor
                            // has an offer of under way is refused once its
                            // chunks are in: they are checked and dropped as
                            // they come, the announced size never allocated.
                            let open = if jobs.contains_key(&task.job_id) || offers.newest(&task.job_id).is_some() {
                                Incoming::start
                            } else {
                                Incoming::start_discarding
                            };
                            let inc = open(&h, &cfg.limits).map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                            if inc.is_complete() && inc.is_discarding() {
                                refuse_unaccepted(&outbox, &task).await;
                            } else if inc.is_complete() {
                                let bulk = inc.finish().map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                                deliver(&jobs, &mut waiting, offers.newest(&task.job_id), &outbox, task, Some(bulk))
                                    .await;
                            } else {
                                let newest = offers.newest(&task.job_id);
                                pending = Some((task, inc, newest));
                            }
                        }
                    }
                }
                coordinator_message::Body::Chunk(c) => {
                    let (_, inc, _) =
                        pending.as_mut().ok_or_else(|| Error::PeerMisbehaved("chunk without a task".into()))?;
                    inc.push(&c).map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                    if inc.is_complete()
                        && let Some((task, inc, newest)) = pending.take()
                    {
                        if inc.is_discarding() {
                            refuse_unaccepted(&outbox, &task).await;
                            continue;
                        }
                        let bulk = inc.finish().map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                        // For the session it was for when its header came:
                        // kept for that offer while it is in flight, else
                        // routed (to the session before any later offer).
                        let in_flight = newest.filter(|n| offers.in_flight_serial(*n));
                        deliver(&jobs, &mut waiting, in_flight, &outbox, task, Some(bulk)).await;
                    }
                }
                coordinator_message::Body::Deployment(d) => {
                    if let Some(registry) = self.serving.get() {
                        match registry.offer(&d) {
                            Ok(Some(pull)) => {
                                outbox.send(party_message::Body::Pull(pull)).await;
                            }
                            Ok(None) => {}
                            Err(e) => warn!("coordinator fault: {e}"),
                        }
                    }
                }
                coordinator_message::Body::ModelPart(part) => {
                    if let Some(registry) = self.serving.get() {
                        match registry.on_part(part) {
                            Ok(Some((deployment, bytes))) => {
                                let service = deployment.record.service.clone();
                                if registry.queue_install(deployment, bytes) {
                                    let registry = registry.clone();
                                    tokio::task::spawn_blocking(move || registry.run_installs(&service));
                                }
                            }
                            Ok(None) => {}
                            Err(e) => warn!("coordinator fault: {e}"),
                        }
                    }
                }
                coordinator_message::Body::CloudKey(a) => {
                    if let Some(registry) = self.serving.get()
                        && let Err(e) = registry.on_cloud_key(&a)
                    {
                        warn!("coordinator fault: {e}");
                    }
                }
                coordinator_message::Body::Forwarded(f) => {
                    if let Some(registry) = self.serving.get() {
                        // A slot for the whole answer, its sending included:
                        // a coordinator that floods requests and reads no
                        // answers holds at most MAX_FORWARDS_IN_FLIGHT here,
                        // one edge at most MAX_FORWARDS_PER_EDGE of them
                        // (and a busy refusal waits on the stream, as any
                        // message does).
                        match registry.forward_slot(&f.peer) {
                            Some(slot) => {
                                let (registry, outbox, metrics) =
                                    (registry.clone(), outbox.clone(), self.metrics.clone());
                                tokio::spawn(async move {
                                    let answer = registry.on_forwarded(f).await;
                                    metrics.forward_answered(if answer.error.is_empty() {
                                        "answered"
                                    } else {
                                        "refused"
                                    });
                                    outbox.send(party_message::Body::ForwardAnswer(answer)).await;
                                    drop(slot);
                                });
                            }
                            None => {
                                self.metrics.forward_answered("busy");
                                let answer = pb::ForwardAnswer {
                                    request_id: f.request_id,
                                    peer: f.peer,
                                    ciphertext: Vec::new(),
                                    error: format!(
                                        "busy: {} forwarded requests are being answered, at most {} of one party's",
                                        crate::serving::joint::MAX_FORWARDS_IN_FLIGHT,
                                        crate::serving::joint::MAX_FORWARDS_PER_EDGE
                                    ),
                                };
                                outbox.send(party_message::Body::ForwardAnswer(answer)).await;
                            }
                        }
                    } else {
                        self.metrics.forward_answered("refused");
                        let answer = pb::ForwardAnswer {
                            request_id: f.request_id,
                            peer: f.peer,
                            ciphertext: Vec::new(),
                            error: "this party serves no models".into(),
                        };
                        outbox.send(party_message::Body::ForwardAnswer(answer)).await;
                    }
                }
                coordinator_message::Body::ForwardAnswer(a) => {
                    if let Some(registry) = self.serving.get()
                        && let Err(e) = registry.on_forward_answer(a)
                    {
                        warn!("coordinator fault: {e}");
                    }
                }
                coordinator_message::Body::Closed(c) => {
                    // From the wire: kept, passed on and logged at a bounded length.
                    let reason: String = c.reason.chars().take(MAX_CLOSE_REASON_CHARS).collect();
                    // A job that ended (not one closed otherwise) settles its
                    // privacy ledger reservation to the rounds it started.
                    let ended = job_end(c.state);
                    if let Some(serial) = offers.newest(&c.job_id) {
                        // One close per offer is enough: later ones change nothing.
                        let kept = waiting.entry(c.job_id.clone()).or_default();
                        if !kept.iter().any(|(n, w)| *n == serial && matches!(w, Waiting::Closed(..))) {
                            kept.push((serial, Waiting::Closed(reason.clone(), ended)));
                        }
                    } else if let Some(job) = jobs.remove(&c.job_id) {
                        job.send(Instant::now(), PartyInput::Closed { reason: reason.clone(), ended });
                    }
                    let state =
                        confide_proto::status::JobState::try_from(c.state).map(|s| s.as_str()).unwrap_or("ended");
                    let job = echoed(&c.job_id);
                    if reason.is_empty() {
                        info!(job = ?job, state, "job closed");
                    } else {
                        info!(job = ?job, state, "job closed: {reason:?}");
                    }
                }
            }
        }
    }

    /// Sends the answer to offer `serial` and makes an accepted job
    /// visible: its worker, to route tasks to, then what came for the job
    /// while this offer was its newest, in order.
    async fn answer(
        &self,
        (outbox, serial): (&Arc<Outbox>, u64),
        jobs: &mut HashMap<String, JobInbox>,
        waiting: &mut Kept,
        offer: pb::JobOffer,
        accepted: Result<(PartySession, WorkerAlive), String>,
    ) {
        let job_id = offer.job_id.clone();
        let answer = match accepted {
            Ok((session, alive)) => {
                let (limits, stats, metrics) = (self.config.limits, self.stats.clone(), self.metrics.clone());
                let worker = spawn_job(job_id.clone(), session, outbox.clone(), limits, (stats, metrics), alive);
                self.metrics.job_offer(true);
                // An older session of the job (before a reconnect) ends with its sender.
                jobs.insert(job_id.clone(), worker);
                info!(job = %job_id, dataset = %offer.dataset, "accepted job");
                pb::JobAnswer { job_id, accepted: true, reason: String::new() }
            }
            Err(reason) => {
                warn!(job = ?job_id, "refused job: {reason}");
                self.metrics.job_offer(false);
                pb::JobAnswer { job_id, accepted: false, reason }
            }
        };
        outbox.send(party_message::Body::JobAnswer(answer)).await;
        let mine = match waiting.remove(&offer.job_id) {
            Some(kept) => {
                let (mine, later): (Vec<_>, Vec<_>) = kept.into_iter().partition(|(n, _)| *n == serial);
                if !later.is_empty() {
                    waiting.insert(offer.job_id.clone(), later);
                }
                mine
            }
            None => Vec::new(),
        };
        for (_, w) in mine {
            match w {
                Waiting::Task(task, bulk) => route(jobs, outbox, task, bulk).await,
                Waiting::Closed(reason, ended) => {
                    if let Some(job) = jobs.remove(&offer.job_id) {
                        job.send(Instant::now(), PartyInput::Closed { reason, ended });
                    }
                }
            }
        }
    }

    /// Applies the local policy to an offer and builds the job's session;
    /// the error is the refusal reason sent to the coordinator.
    async fn accept(&self, offer: &pb::JobOffer, me: &str) -> Result<PartySession, String> {
        // First: the ledger, the worker thread and the logs are keyed by it.
        confide_proto::validate_job_id(&offer.job_id)?;
        // The node's one acceptance slot, held by this future and by each
        // of its blocking steps (a step goes on when the future is dropped
        // with its connection): a coordinator that hangs up behind every
        // offer gets one set-up at a time, not one per connection.
        let slot = loop {
            let waiting = tokio::time::timeout(SLOT_WARNING, self.acceptance_slot.clone().acquire_owned());
            match waiting.await {
                Ok(slot) => break slot.map_err(|e| e.to_string())?,
                // A blocking step that never ends (a hung mount, a plug-in
                // that blocks) stops every acceptance: say so.
                Err(_) => warn!(
                    job = %offer.job_id,
                    "an earlier acceptance's blocking work (or the freeing of sessions held when a connection \
                     ended) has not ended for {} s; this offer waits for it",
                    SLOT_WARNING.as_secs()
                ),
            }
        };
        let slot = Arc::new(slot);
        let cfg = &self.config;
        // On a blocking thread: validating a `[dp]` table runs its
        // accountant (the PLD's grids can take seconds), which must not
        // stall the runtime that also serves this hospital's applications.
        let (text, file, limits, plugins) =
            (offer.spec_toml.clone(), format!("offer of job {}", offer.job_id), cfg.limits, self.plugins.clone());
        let spec = holding(&slot, move || JobSpec::parse_offer(&text, &file, &limits, plugins.protocols()))
            .await
            .map_err(|e| {
                // (A panic's text stays here, as a trainer's does.)
                warn!(job = %offer.job_id, "checking the offered spec panicked: {e}");
                "checking the job spec failed (the detail is in this party's log)".to_string()
            })?
            .map_err(|e| format!("invalid job spec: {e}"))?;
        // The offer's data set and this party's place are the spec's: the
        // coordinator cannot run an audited spec on another data set of the
        // hospital's, nor recruit a party the spec does not name.
        let named = spec.dataset_for(me);
        if offer.dataset != named {
            return Err(format!(
                "the offer names data set {:?}, but the job spec gives this party {:?}",
                echoed(&offer.dataset),
                echoed(named)
            ));
        }
        if !spec.parties.names.is_empty() && !spec.parties.names.iter().any(|n| n == me) {
            return Err("the job spec does not name this party".into());
        }
        let source = crate::policy::consider(&spec, &offer.dataset, &cfg.policy, &self.plugins, &cfg.datasets)?;
        // The model at this party's width, where it is known before the
        // rows are read (a DP job's always), against the party's limit,
        // before anything is reserved or allocated.
        if let Some(width) = crate::trainers::dp_width(&spec, source)?.or(source.features) {
            crate::trainers::check_model_size(&spec, width, &cfg.limits)?;
        }
        let identity = identity(cfg, me, &self.revocations, self.released.clone())?;
        // Checked again at every offer: a watched directory's files, and
        // links, change while the party runs. The detail (local paths)
        // stays in this party's log.
        // On a blocking thread, not the runtime's (it reads every watched
        // directory).
        let datasets = cfg.datasets.clone();
        let overlap = holding(&slot, move || crate::config::overlapping_datasets(&datasets))
            .await
            .unwrap_or_else(|e| Err(format!("the data sets' overlap check panicked: {e}")));
        if let Err(e) = overlap {
            warn!(job = %offer.job_id, "refused: {e}");
            return Err("two of this party's data sets read the same rows (the detail is in its log); it accepts \
                        no job until its configuration is fixed"
                .into());
        }
        // The job's whole privacy cost is reserved, durably, before the data
        // is touched.
        // (An evaluate job the policy lets run outside the budget reserves nothing.)
        let outside_budget = crate::policy::outside_budget(&spec, &cfg.policy);
        // Under DP, for an evaluation outside a party's budget (whose rows
        // its policy protects otherwise), and under a protocol that hides
        // each party's values, why the rows could not be selected or set up
        // (a malformed cell quoted, a label, the data set's path) stays here.
        let hides_values = self
            .plugins
            .protocols()
            .get(&spec.aggregation.protocol)
            .is_none_or(|p| p.reveals() != confide_crypto::aggregation::Reveals::Updates);
        let keeps_reasons = spec.dp.is_some() || outside_budget || hides_values;
        // A pipeline's job where pipelines are unavailable is refused here,
        // before any ε is reserved (not only when its rows are selected).
        if spec.pipeline.is_some()
            && let Err(e) = &self.watches
        {
            warn!(job = %offer.job_id, "incremental pipelines are unavailable: {e}");
            return Err("incremental pipelines are unavailable at this party (the reason is in its log)".into());
        }
        // A pipeline's training jobs no closer together than the hospital
        // allows, checked (and the slot claimed, durably) before any ε is
        // reserved: the coordinator keeps `max_iterations`, not the party.
        if let (Some(p), Some(min_secs), Ok(w)) = (&spec.pipeline, cfg.policy.min_pipeline_train_secs, &self.watches)
            && spec.kind == confide_proto::jobspec::JobKind::Train
        {
            let (w, pipeline, job) = (w.clone(), p.job.clone(), offer.job_id.clone());
            holding(&slot, move || w.claim_training(&pipeline, &job, min_secs)).await.map_err(|e| {
                warn!(job = %offer.job_id, "claiming the pipeline's training slot panicked: {e}");
                "claiming the pipeline's training slot failed (the detail is in this party's log)".to_string()
            })??;
        }
        let job_budget = if outside_budget {
            None
        } else {
            let ledger = self.ledger.clone()?;
            let rows_at = crate::config::resolved_path(&source.path);
            let budget = crate::ledger::Budget {
                epsilon: cfg.policy.max_epsilon,
                delta: cfg.policy.max_delta,
                extra_rounds: cfg.policy.max_extra_rounds,
            };
            // On a blocking thread too: the cost's accountant, and the
            // ledger's synced write.
            let (job, reserved, dataset) = (offer.job_id.clone(), spec.clone(), offer.dataset.clone());
            let reservation =
                holding(&slot, move || ledger.reserve_at(&job, &reserved, &dataset, Some(&rows_at), budget))
                    .await
                    .map_err(|e| {
                    warn!(job = %offer.job_id, "the privacy ledger's reservation panicked: {e}");
                    "the privacy ledger's reservation failed (the detail is in this party's log)".to_string()
                })??;
            Some(reservation)
        };
        // A pipeline's job narrows the watched data set to its batches (a
        // train job marks the new ones as its iteration's), once the budget
        // is reserved.
        let source = match (&spec.pipeline, &self.watches) {
            (None, _) => source.clone(),
            // On a blocking thread: it lists the watched directory and
            // writes the pipeline's state, for as long as the data set takes
            // (on the loop's task, a message behind the offer would wait).
            (Some(_), Ok(w)) => {
                let (w, picked, dataset, source) = (w.clone(), spec.clone(), offer.dataset.clone(), source.clone());
                holding(&slot, move || w.select_keeping_reasons(&picked, &dataset, &source, keeps_reasons))
                    .await
                    .map_err(|e| {
                        warn!(job = %offer.job_id, "selecting the pipeline's batches panicked: {e}");
                        "selecting the pipeline's batches failed (the detail is in this party's log)".to_string()
                    })??
            }
            (Some(_), Err(e)) => {
                // (The reason names local files: it stays in this log.)
                warn!(job = %offer.job_id, "incremental pipelines are unavailable: {e}");
                return Err("incremental pipelines are unavailable at this party (the reason is in its log)".into());
            }
        };
        let (plugins, trainers, limits) = (self.plugins.clone(), self.trainers.clone(), cfg.limits);
        let min_parties = cfg.policy.min_parties;
        let noise_rounds_ahead = cfg.training.dp_noise_rounds_ahead;
        let (job_id, party, dataset) = (offer.job_id.clone(), me.to_owned(), offer.dataset.clone());
        let answer_floor = crate::policy::answer_floor(&spec, &cfg.policy)
            .map(|(stage, secs)| crate::session::AnswerFloor { stage, after: (secs * 1000.0).ceil() as u64 });
        let answers_held = answer_floor.is_some();
        let spec = Arc::new(spec);
        let idle_after = spec.timeouts.round_secs * 2000;
        let local_path = source.path.clone();
        // Where a pipeline's labelled rows are copied to (beside the key):
        // kept out of refusals too.
        let scratch = cfg.key.with_extension("pipelines");
        let handler = holding(&slot, move || {
            let kind = plugins.kind(spec.kind.as_str()).ok_or("job kind not available")?;
            let cx = JobContext {
                job_id: &job_id,
                spec: &spec,
                party: &party,
                dataset: &source,
                trainers: trainers.as_ref(),
                protocols: plugins.protocols(),
                identity,
                limits: &limits,
                min_parties,
                budget: job_budget,
                noise_rounds_ahead,
                answers_held,
            };
            kind.handler(cx).map_err(|e| format!("data set {dataset:?}: {e}"))
        })
        .await
        .map_err(|e| {
            // The panic's message can quote a row: it stays in this log.
            warn!(job = %offer.job_id, "trainer set-up panicked: {e}");
            "trainer set-up panicked (the message is in this party's log)".to_string()
        })
        .and_then(|built| built);
        // Under DP, why the job could not be set up on the data (a label out
        // of range, a malformed cell) is about the rows: it stays in this
        // party's log, and the reservation stands (the data was read).
        let handler = match (handler, keeps_reasons) {
            (Ok(h), _) => h,
            // Sent, but without the data set's local path or a cell's
            // contents (a patient's value; found by review): the whole
            // reason stays in this party's log.
            (Err(e), false) => {
                warn!(job = %offer.job_id, "refused: {e}");
                let resolved = crate::config::resolved_path(&local_path);
                let scratch_resolved = crate::config::resolved_path(&scratch);
                return Err(withheld_from_rows(&e, &[&local_path, &resolved, &scratch, &scratch_resolved]));
            }
            (Err(e), true) => {
                warn!(job = %offer.job_id, "refused: {e}");
                return Err("could not set up the job on its data set (the reason is in this party's log)".into());
            }
        };
        Ok(PartySession::new(&offer.job_id, handler, idle_after).with_answer_floor(answer_floor))
    }
}

/// `reason` (why a job could not be set up on its data) as the coordinator
/// may read it: the data set's local `paths` named "the data set's file",
/// and every quoted cell (`value "…"`, `label "…"`) withheld.
fn withheld_from_rows(reason: &str, paths: &[&std::path::Path]) -> String {
    let mut out = reason.to_string();
    // The longest first (an absolute path holds the relative one), and only
    // paths with a separator: a bare relative name such as `data` would
    // also replace words of the message.
    // (A directory configured with a trailing separator is matched without
    // it, so that the separator before a batch's name stays to be found.)
    let mut shown: Vec<String> = paths
        .iter()
        .map(|p| {
            let s = p.display().to_string();
            let trimmed = s.trim_end_matches(std::path::MAIN_SEPARATOR);
            if trimmed.is_empty() { s } else { trimmed.to_owned() }
        })
        .collect();
    shown.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in shown.iter().filter(|p| p.contains(std::path::MAIN_SEPARATOR)) {
        out = out.replace(p.as_str(), "the data set's file");
    }
    // A watched directory's batch, or a pipeline's scratch file: its name
    // (a date, an export's name) stays in this log too (found by review).
    let marker = format!("the data set's file{}", std::path::MAIN_SEPARATOR);
    while let Some(at) = out.find(&marker) {
        let rest = &out[at + marker.len()..];
        // The name runs to a `:` (a line number, or the message), a `,`, a
        // `)`, or, for a name with spaces, the end of its extension.
        let mut end = rest.find([':', ',', ')', '"']).unwrap_or(rest.len());
        let lower = rest[..end].to_ascii_lowercase();
        for ext in [".csv.gz", ".csv"] {
            if let Some(i) = lower.find(ext) {
                end = end.min(i + ext.len());
                break;
            }
        }
        out = format!("{}a batch of the data set{}", &out[..at], &rest[end..]);
    }
    // A label given unquoted (`label 7 is outside the model's 2 classes`).
    let mut kept = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(at) = rest.find("label ") {
        let after = &rest[at + "label ".len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        kept.push_str(&rest[..at + "label ".len()]);
        if digits > 0 {
            kept.push_str("(withheld)");
        }
        rest = &after[digits..];
    }
    kept.push_str(rest);
    out = kept;
    for key in ["value \"", "label \""] {
        let mut kept = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(key) {
            kept.push_str(&rest[..at + key.len() - 1]);
            kept.push_str("(withheld)");
            let quoted = &rest[at + key.len()..];
            // The closing quote of a `{:?}`-quoted cell: not escaped.
            let mut escaped = false;
            let end = quoted.char_indices().find_map(|(i, c)| match c {
                _ if escaped => {
                    escaped = false;
                    None
                }
                '\\' => {
                    escaped = true;
                    None
                }
                '"' => Some(i + 1),
                _ => None,
            });
            rest = end.map_or("", |e| &quoted[e..]);
        }
        kept.push_str(rest);
        out = kept;
    }
    out
}

/// Runs `f` on a blocking thread that holds `slot` until `f` returns and,
/// if the acceptance awaiting it was dropped (with its connection), until
/// its value (the rows, a trainer) is freed there too. The error is a
/// panic's message.
async fn holding<T: Send + 'static>(
    slot: &Arc<tokio::sync::OwnedSemaphorePermit>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let step_slot = slot.clone();
    drop(tokio::task::spawn_blocking(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|p| crate::session::panic_message(p.as_ref()));
        // Nobody waits any more: freed here, before the slot.
        if let Err(unsent) = tx.send(result) {
            drop(unsent);
        }
        drop(step_slot);
    }));
    let mut receiving = Receiving { rx, slot: slot.clone() };
    (&mut receiving.rx).await.unwrap_or_else(|_| Err("the blocking step ended without a result".into()))
}

/// A blocking step's result on its way to the acceptance. Dropped with the
/// acceptance before the result is taken (the step had sent it), the
/// result is freed on a blocking thread under the slot, not on the
/// message loop's task, where it would delay the reconnect.
struct Receiving<T: Send + 'static> {
    rx: tokio::sync::oneshot::Receiver<Result<T, String>>,
    slot: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl<T: Send + 'static> Drop for Receiving<T> {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(unread) = self.rx.try_recv() {
            let slot = self.slot.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop((unread, slot)))),
                Err(_) => drop((unread, slot)),
            }
        }
    }
}

/// How a job ended, from a close's state: only a terminal state (not an
/// unknown or running one a coordinator might send) settles the job's
/// privacy ledger reservation.
fn job_end(state: i32) -> Option<String> {
    confide_proto::status::JobState::try_from(state).ok().filter(|s| s.is_terminal()).map(|s| s.as_str().to_owned())
}

/// Milliseconds to wait before connecting again: the back-off's `delay`,
/// or longer if the coordinator refused the last join saying when it takes
/// one again (waiting less would only be refused once more).
fn reconnect_wait(delay: u64, asked: Option<Duration>) -> u64 {
    let asked = asked.map_or(0, |w| u64::try_from(w.as_millis()).unwrap_or(u64::MAX));
    delay.max(asked)
}

/// The error for a join the coordinator refused, keeping its "retry in".
fn join_refused(status: tonic::Status) -> Error {
    let message = format!("coordinator refused the stream: {}", status.message());
    match confide_proto::net::retry_after(&status) {
        Some(wait) => Error::Throttled(message, wait),
        None => Error::Transport(message),
    }
}

/// The first message: with a delegation when the server this party dialled
/// is a relay (its verified certificate says so), so that the relay can
/// carry the stream to the coordinator, and only that relay.
fn hello(cfg: &PartyConfig, server: &CoordinatorCertificate) -> Result<pb::Hello, String> {
    let mut hello = pb::Hello {
        software_version: VERSION.into(),
        // Advertised so administrators see what this party accepts; it is
        // applied here to every offer whatever the coordinator does with it.
        // (Not sent when it exceeds what the coordinator keeps: 16 KiB.)
        policy_json: serde_json::to_string(&cfg.policy)
            .ok()
            .filter(|j| j.len() <= confide_proto::MAX_ADVERTISED_POLICY)
            .unwrap_or_default(),
        ..Default::default()
    };
    let shown = server.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let server = shown
        .map(|c| confide_crypto::pki::peer_identity(&c))
        .transpose()
        .map_err(|e| format!("{}: the server's certificate: {e}", cfg.coordinator))?
        .ok_or_else(|| format!("{}: no server certificate", cfg.coordinator))?;
    let Some(relay) = relay_to_delegate(cfg.relay.as_deref(), &server, &cfg.coordinator)? else {
        return Ok(hello);
    };
    let me = own_identity(cfg)?;
    let key = confide_crypto::pki::read_private_key(&cfg.key).map_err(|e| e.to_string())?;
    let key = IdentityKey::from_pem(&key).map_err(|e| format!("{}: {e}", cfg.key.display()))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (signature, nonce) = confide_crypto::relay::sign_delegation(&key, &me.name, &relay.name, now)
        .map_err(|e| format!("signing the delegation to relay {}: {e}", relay.name))?;
    hello.relay_delegation = signature;
    hello.delegation_nonce = nonce.to_vec();
    hello.delegation_time = now;
    info!(relay = %relay.name, "dialled a relay; delegating this party's stream to it");
    Ok(hello)
}

/// This party's identity, as its own certificate names it.
fn own_identity(cfg: &PartyConfig) -> Result<confide_crypto::pki::PeerIdentity, String> {
    let own = confide_proto::net::load_certs(&cfg.cert).map_err(|e| e.to_string())?;
    own.first()
        .map(|c| confide_crypto::pki::peer_identity(c))
        .transpose()
        .map_err(|e| format!("{}: {e}", cfg.cert.display()))?
        .ok_or_else(|| format!("{}: no certificate", cfg.cert.display()))
}

/// Whom the server this party dialled is, against its config: the
/// coordinator when no relay is configured; exactly the configured relay
/// otherwise (returned: the party delegates its stream to it).
fn relay_to_delegate(
    configured: Option<&str>,
    server: &confide_crypto::pki::PeerIdentity,
    url: &str,
) -> Result<Option<confide_crypto::pki::PeerIdentity>, String> {
    use confide_crypto::pki::Role;
    match (configured, server.role) {
        (None, Role::Coordinator) => Ok(None),
        (Some(r), Role::Relay) if r == server.name => Ok(Some(server.clone())),
        (None, Role::Relay) => Err(format!(
            "{url} is relay {}, which this party's config does not name (set `relay = \"{}\"` to dial it)",
            server.name, server.name
        )),
        (Some(r), Role::Relay) => Err(format!("{url} is relay {}, not the configured relay {r}", server.name)),
        (Some(r), Role::Coordinator) => {
            Err(format!("{url} is the coordinator, but this party's config names relay {r}"))
        }
        (_, role) => {
            Err(format!("{url} shows a {role:?} certificate ({}), neither coordinator nor relay", server.name))
        }
    }
}

/// The party's identity for protocols that sign and verify: its certificate
/// key, the federation CA and the revocation list.
fn identity(
    cfg: &PartyConfig,
    me: &str,
    revocations: &SharedRevocations,
    released: Arc<confide_crypto::aggregation::Released>,
) -> Result<PartyIdentity, String> {
    let key = confide_crypto::pki::read_private_key(&cfg.key).map_err(|e| e.to_string())?;
    let key = IdentityKey::from_pem(&key).map_err(|e| format!("{}: {e}", cfg.key.display()))?;
    let ca_pem = std::fs::read(&cfg.ca).map_err(|e| format!("{}: {e}", cfg.ca.display()))?;
    let verifier = CertVerifier::with_revocations(&ca_pem, revocations.clone())
        .map_err(|e| format!("{}: {e}", cfg.ca.display()))?;
    Ok(PartyIdentity { name: me.to_owned(), signer: Arc::new(key), peers: Box::new(verifier), released })
}

/// Tasks of one job that may wait for its worker (an honest coordinator
/// sends a job's next task after the party's answer, or after its stage
/// closed without it); more fail at once, so that a coordinator cannot
/// pile up tasks (each up to the limits' largest bulk) behind a busy worker.
const MAX_QUEUED_PER_JOB: usize = 4;

/// Tasks that may wait for their workers, in all jobs together.
const MAX_QUEUED: usize = 16;

/// A job's worker: its inbox (each input with when it reached the party,
/// for the task's latency in the log), how many of its tasks wait there,
/// and its thread (a job counts against `policy.max_jobs` while it runs).
struct JobInbox {
    tx: Sender<(Instant, PartyInput)>,
    queued: Arc<AtomicUsize>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl JobInbox {
    /// Passes `input`, which reached the party at `arrived`, on; false
    /// when the worker has ended.
    fn send(&self, arrived: Instant, input: PartyInput) -> bool {
        let task = matches!(input, PartyInput::Task(_));
        if task {
            self.queued.fetch_add(1, Ordering::AcqRel);
        }
        let sent = self.tx.send((arrived, input)).is_ok();
        if task && !sent {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Whether the job's worker still runs.
    fn running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }
}

/// Converts a task and hands it to its job's thread; a task for a job this
/// party is not in, or one that does not convert, fails at once.
async fn route(jobs: &HashMap<String, JobInbox>, outbox: &Outbox, task: pb::Task, bulk: Option<Bulk>) {
    let arrived = Instant::now();
    let (job_id, task_id) = (task.job_id.clone(), task.task_id);
    let reason = match Task::try_from((task, bulk)) {
        Ok(task) => match jobs.get(&job_id) {
            Some(w) if w.queued.load(Ordering::Acquire) >= MAX_QUEUED_PER_JOB => {
                format!("coordinator fault: {MAX_QUEUED_PER_JOB} tasks of this job already wait for the party's worker")
            }
            Some(_)
                if jobs.values().filter(|w| w.running()).map(|w| w.queued.load(Ordering::Acquire)).sum::<usize>()
                    >= MAX_QUEUED =>
            {
                format!("coordinator fault: {MAX_QUEUED} tasks already wait for this party's workers")
            }
            Some(w) if w.send(arrived, PartyInput::Task(task)) => return,
            _ => "this party has not accepted the job".to_string(),
        },
        Err(e) => format!("coordinator fault: malformed task: {e}"),
    };
    let job_id = echoed(&job_id);
    outbox.send(party_message::Body::Failed(pb::TaskFailed { job_id, task_id, reason })).await;
}

/// Refuses a task of a job this party has not accepted (as [`route`]
/// does), once its chunks, which were not kept, are in.
async fn refuse_unaccepted(outbox: &Outbox, task: &pb::Task) {
    let failed = pb::TaskFailed {
        job_id: echoed(&task.job_id),
        task_id: task.task_id,
        reason: "this party has not accepted the job (its chunks were not kept)".into(),
    };
    outbox.send(party_message::Body::Failed(failed)).await;
}

/// One thread per job runs its session and owns its trainer.
fn spawn_job(
    job_id: String,
    session: PartySession,
    outbox: Arc<Outbox>,
    limits: Limits,
    (stats, metrics): (Arc<NodeStats>, SharedMetrics),
    alive: WorkerAlive,
) -> JobInbox {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, PartyInput)>();
    let queued = Arc::new(AtomicUsize::new(0));
    let inbox = Inbox { rx, queued: queued.clone(), started: Instant::now() };
    let spawned = std::thread::Builder::new().name(format!("job-{job_id}")).spawn(move || {
        let _alive = alive;
        run_job(job_id, session, inbox, Sent { outbox, limits, stats, metrics })
    });
    let worker = spawned.map_err(|e| warn!("cannot start a worker thread: {e}")).ok();
    JobInbox { tx, queued, worker }
}

/// The worker's end of a [`JobInbox`].
struct Inbox {
    rx: Receiver<(Instant, PartyInput)>,
    /// Decremented as each task is taken up.
    queued: Arc<AtomicUsize>,
    /// The worker's clock starts with it.
    started: Instant,
}

/// Where a job's worker reads its time and waits for its inputs. A node's
/// is the wall clock and the job's channel ([`Inbox`]); a test's can be a
/// script on a virtual clock, so the answer floor's timing is checked
/// without timing the machine.
trait WorkerInbox {
    /// Milliseconds since the worker started.
    fn now(&self) -> Millis;
    /// The next input with its arrival, or `Timeout` once `wait` passed
    /// without one, or `Disconnected` once the job's sender is gone.
    fn recv(&mut self, wait: Duration) -> Result<(Instant, PartyInput), RecvTimeoutError>;
    /// A task was taken up (the node's count of queued tasks).
    fn task_taken(&self) {}
}

impl WorkerInbox for Inbox {
    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }
    fn recv(&mut self, wait: Duration) -> Result<(Instant, PartyInput), RecvTimeoutError> {
        self.rx.recv_timeout(wait)
    }
    fn task_taken(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often a serving party reports its counts (when they changed).
const SERVING_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Sends the serving counts every [`SERVING_REPORT_EVERY`] while they
/// change, until the stream closes.
async fn report_serving(registry: Arc<crate::serving::Registry>, outbox: Arc<Outbox>) {
    let mut last: Vec<pb::ServiceRows> = Vec::new();
    loop {
        let now: Vec<pb::ServiceRows> =
            registry.tally().into_iter().take(confide_proto::MAX_SERVING_SERVICES).collect();
        if now != last {
            if !outbox.send(party_message::Body::Serving(pb::ServingReport { services: now.clone() })).await {
                return;
            }
            last = now;
        }
        tokio::select! {
            _ = tokio::time::sleep(SERVING_REPORT_EVERY) => {}
            _ = outbox.tx.closed() => return,
        }
    }
}

/// Where a job's worker sends its outputs, and what it counts.
struct Sent {
    outbox: Arc<Outbox>,
    limits: Limits,
    stats: Arc<NodeStats>,
    metrics: SharedMetrics,
}

fn run_job(job_id: String, mut session: PartySession, mut inbox: impl WorkerInbox, to: Sent) {
    // Entered for the thread's life: every line the job logs names it.
    let job_span = tracing::info_span!("job", job = %job_id);
    let _job_entered = job_span.enter();
    let mut task_arrived: Option<Instant> = None;
    // The task being worked on: its round and stage on every line logged
    // while it is handled and answered.
    let mut task_span = tracing::Span::none();
    // Inputs read while an answer was held, in order, with their arrival.
    let mut pending: std::collections::VecDeque<(Instant, PartyInput)> = Default::default();
    loop {
        while let Some(out) = session.poll_output() {
            let _entered = task_span.enter();
            if !send(&job_id, out, &to, task_arrived.take()) {
                return;
            }
        }
        if session.is_closed() {
            break;
        }
        let wait = session
            .next_deadline()
            .map_or(Duration::from_secs(3600), |d| Duration::from_millis(d.saturating_sub(inbox.now())));
        if session.holding() {
            // No new task while an answer is held: training it now could
            // run past the floor and delay the held answer. Tasks wait in
            // order; the job's close is handled at once (a held answer dies
            // with the job, and the round's secrets are wiped).
            match inbox.recv(wait) {
                Ok((_, closed @ PartyInput::Closed { .. })) => session.handle(inbox.now(), closed),
                Ok(input) => {
                    pending.push_back(input);
                    // A busy inbox does not hold the answer past its floor.
                    if session.next_deadline().is_some_and(|d| inbox.now() >= d) {
                        session.handle(inbox.now(), PartyInput::Tick);
                    }
                }
                Err(RecvTimeoutError::Timeout) => session.handle(inbox.now(), PartyInput::Tick),
                Err(RecvTimeoutError::Disconnected) => {
                    session.handle(inbox.now(), PartyInput::Closed { reason: String::new(), ended: None })
                }
            }
            continue;
        }
        let (arrived, input) = match pending.pop_front().map_or_else(|| inbox.recv(wait), Ok) {
            Ok(received) => received,
            Err(RecvTimeoutError::Timeout) => (Instant::now(), PartyInput::Tick),
            Err(RecvTimeoutError::Disconnected) => {
                (Instant::now(), PartyInput::Closed { reason: String::new(), ended: None })
            }
        };
        let answered = matches!(input, PartyInput::Task(_));
        if let PartyInput::Task(t) = &input {
            inbox.task_taken();
            task_arrived = Some(arrived);
            task_span = tracing::info_span!("round", round = t.round, stage = %t.body.stage_name());
        }
        let entered = task_span.enter();
        // At the time it is taken up, not when it arrived: a fit's floor
        // then covers whatever ran before it (an earlier step, idle work),
        // and no fit is taken while an earlier one's answer is held, so
        // its start does not depend on that one's training.
        session.handle(inbox.now(), input);
        if answered {
            // Send the answer first, then work ahead while the others answer.
            while let Some(out) = session.poll_output() {
                if !send(&job_id, out, &to, task_arrived.take()) {
                    return;
                }
            }
            session.handle(inbox.now(), PartyInput::Idle);
        }
        drop(entered);
    }
    debug!(job = %job_id, "worker ended");
}

/// Sends one output (a result `since` its task arrived, when known); false
/// when the stream is gone.
fn send(job_id: &str, out: PartyOutput, to: &Sent, since: Option<Instant>) -> bool {
    let (outbox, limits, stats) = (&*to.outbox, &to.limits, &*to.stats);
    match out {
        PartyOutput::Result(result) => {
            let (round, task_id, stage) = (result.round, result.task_id, result.body.stage_name().to_owned());
            let (mut msg, bulk) = result.into_wire();
            let encoded = bulk.map(|b| match b {
                Bulk::Words(w) => transfer::encode_words(task_id, w),
                b => transfer::encode(task_id, &b),
            });
            let what = match &encoded {
                Some(e) if e.header.kind == pb::BulkKind::U32Words as i32 => "a masked vector only",
                Some(_) => "parameters, counts and metrics only",
                None => "counts, metrics or protocol messages only",
            };
            let bytes = encoded.as_ref().map_or(0, |e| e.bytes.len());
            msg.bulk = encoded.as_ref().map(|e| e.header.clone());
            // A poisoned lock guards nothing but order: go on with it.
            let _transfer = outbox.transfer.lock().unwrap_or_else(|p| p.into_inner());
            if !outbox.send_blocking(party_message::Body::Result(msg)) {
                return false;
            }
            if let Some(e) = &encoded {
                for chunk in transfer::chunks(task_id, &e.bytes, limits.chunk_bytes) {
                    if !outbox.send_blocking(party_message::Body::Chunk(chunk)) {
                        return false;
                    }
                }
            }
            stats.tasks_done.fetch_add(1, Ordering::Relaxed);
            let took = since.map(|t| t.elapsed());
            to.metrics.task_done(&stage, took);
            let ms = took.map(|d| d.as_millis() as u64);
            info!(job = %job_id, round, stage = %stage, bytes, ms, "sent result ({what})");
            true
        }
        PartyOutput::Failed { task_id, reason } => {
            warn!(job = %job_id, task_id, "task failed: {reason}");
            let failed = pb::TaskFailed { job_id: job_id.to_owned(), task_id, reason };
            outbox.send_blocking(party_message::Body::Failed(failed))
        }
        PartyOutput::Note(note) => {
            warn!(job = %job_id, "{note}");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_crypto::pki::PkiDir;
    use std::path::{Path, PathBuf};

    /// Only a close that says the job reached a terminal state settles its
    /// reservation: a coordinator's close in a running (or unknown) state
    /// settles nothing.
    #[test]
    fn only_a_terminal_close_is_a_jobs_end() {
        use confide_proto::status::JobState;
        for (state, ended) in [
            (JobState::Succeeded, Some("succeeded")),
            (JobState::Failed, Some("failed")),
            (JobState::Cancelled, Some("cancelled")),
            (JobState::Running, None),
            (JobState::Pending, None),
        ] {
            assert_eq!(job_end(pb::JobState::from(state) as i32).as_deref(), ended, "{state:?}");
        }
        assert_eq!(job_end(9_999), None, "an unknown state");
    }

    /// A join refused for reconnecting too often is retried no sooner than
    /// the refusal asks (the coordinator's budget would refuse it again),
    /// and no later than the bound however large the hint; any other
    /// refusal keeps the back-off's own delay.
    #[test]
    fn a_join_refused_for_reconnecting_too_often_waits_as_long_as_it_is_asked() {
        let refused = confide_proto::net::with_retry_after(
            tonic::Status::resource_exhausted("hospital-a opened 30 streams without pause; retry in 1800 ms"),
            Duration::from_millis(1800),
        );
        let e = join_refused(refused);
        let Error::Throttled(message, wait) = &e else { panic!("{e:?}") };
        assert!(message.contains("retry in 1800 ms"), "{message}");
        assert_eq!(*wait, Duration::from_millis(1800));
        assert_eq!(reconnect_wait(250, Some(*wait)), 1800, "the hint outlasts the back-off");
        assert_eq!(reconnect_wait(4000, Some(*wait)), 4000, "the back-off outlasts the hint");
        // A coordinator cannot stall a party for longer than the bound.
        let stall = confide_proto::net::with_retry_after(
            tonic::Status::resource_exhausted("wait"),
            Duration::from_secs(86_400),
        );
        let Error::Throttled(_, wait) = join_refused(stall) else { panic!("throttled") };
        assert_eq!(wait, confide_proto::net::MAX_RETRY_AFTER);
        // Other refusals, or a hint on another code, keep the back-off.
        let other =
            confide_proto::net::with_retry_after(tonic::Status::permission_denied("revoked"), Duration::from_secs(60));
        assert!(matches!(join_refused(other), Error::Transport(_)));
        let mut malformed = tonic::Status::resource_exhausted("wait");
        malformed.metadata_mut().insert(confide_proto::net::RETRY_AFTER_MS, "soon".parse().unwrap());
        assert!(matches!(join_refused(malformed), Error::Transport(_)));
        assert_eq!(reconnect_wait(250, None), 250);
    }

    /// What an offer is refused for on arrival, at once, from the message
    /// alone: the field at fault is named, the id echoed is at most 64
    /// bytes (cut at a character's boundary), and the reason stays short.
    /// Under an answer floor fewer offers may be in flight.
    #[test]
    fn an_offer_is_refused_on_arrival_for_the_message_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pki = party_a(dir.path());
        let node = node_with(&pki, "a", |cfg| {
            cfg.datasets.insert("bc".into(), one_feature(&dir.path().join("bc.csv")));
        });
        let cfg = &node.config;
        let offer = |job_id: &str, spec: usize, dataset: &str| pb::JobOffer {
            job_id: job_id.into(),
            spec_toml: "#".repeat(spec),
            dataset: dataset.into(),
        };
        let refused = |o: &pb::JobOffer, in_flight, floor| refuse_on_arrival(o, cfg, in_flight, floor);
        assert!(refused(&offer("j-1", 10, "bc"), 0, None).is_none());
        let long = "x".repeat(1 << 20);
        // Byte 64 falls inside a character ('€' is three bytes).
        let wide = format!("ab{}", "€".repeat(1 << 18));
        let private = "\u{e000}".repeat(1 << 18);
        for (o, field) in [
            (offer("bad id", 10, "bc"), "job_id"),
            (offer(&long, 10, "bc"), "job_id"),
            (offer(&wide, 10, "bc"), "job_id"),
            (offer(&private, 10, "bc"), "job_id"),
            (offer("j-1", 10, &wide), "no data set named"),
            (offer("j-1", cfg.limits.max_spec_bytes + 1, "bc"), "spec_toml"),
            (offer("j-1", 10, "other"), "no data set named \"other\""),
            (offer("j-1", 10, &long), "no data set named"),
        ] {
            let a = refused(&o, 0, None).expect("refused");
            assert!(!a.accepted && a.reason.contains(field), "{field}: {}", a.reason);
            assert!(a.job_id.len() <= confide_proto::MAX_JOB_ID_LEN && a.reason.len() < 1024, "{}", a.reason.len());
        }
        let floor = Some(Duration::from_secs(3));
        assert!(refused(&offer("j-1", 10, "bc"), MAX_OFFERS_UNDER_FLOOR - 1, floor).is_none());
        let a = refused(&offer("j-1", 10, "bc"), MAX_OFFERS_UNDER_FLOOR, floor).expect("refused");
        assert!(a.reason.contains("in flight under policy.min_answer_after_secs"), "{}", a.reason);
        assert!(refused(&offer("j-1", 10, "bc"), MAX_OFFERS_UNDER_FLOOR, None).is_none());
        assert!(refused(&offer("j-1", 10, "bc"), MAX_OFFERS_IN_FLIGHT, None).is_some());
    }

    /// `answer_fit_after_secs` against a coordinator that times training
    /// (T = 1.2 s), run on a virtual clock through the worker's own loop
    /// ([`run_job`]): training and steps advance the clock by what they
    /// would take, inputs arrive at scripted times, and each answer is
    /// stamped when the worker sent it. An attacker's test compares two
    /// trainings:
    /// - it queues a second fit while the first trains (the second refused
    ///   at once, as a model of the wrong shape would be): the second is
    ///   answered at the same time whether the first trained 0.3 s or 0.8 s,
    ///   two floors after both were sent, since no task is taken while an
    ///   answer is held and a fit's floor starts when it is taken;
    /// - it sends a fit right behind a slow step (0.5 s): the fit is
    ///   answered at the same time whether it trained 0.1 s or 0.6 s, its
    ///   floor covering the step;
    /// - it closes the job while an answer is held: the answer dies with
    ///   the job, at once.
    #[test]
    fn answers_come_at_times_training_does_not_move() {
        use crate::session::{JobHandler, TaskError};
        use confide_proto::messages::{Envelope, ResultBody, Task, TaskBody};
        /// Time passes only when a handler works or the worker waits.
        type Clock = Arc<AtomicU64>;
        struct Timed {
            clock: Clock,
            train_ms: u64,
            step_ms: u64,
            refuse_second_fit: bool,
        }
        impl JobHandler for Timed {
            fn on_task(&mut self, task: Task) -> Result<ResultBody, TaskError> {
                match task.body {
                    TaskBody::Fit { .. } if task.task_id == 2 && self.refuse_second_fit => {
                        Err(TaskError::Refused("a model of the wrong shape".into()))
                    }
                    TaskBody::Fit { .. } => {
                        self.clock.fetch_add(self.train_ms, Ordering::SeqCst);
                        Ok(ResultBody::Fit { metrics: Default::default(), contribution: Default::default() })
                    }
                    _ => {
                        self.clock.fetch_add(self.step_ms, Ordering::SeqCst);
                        Ok(ResultBody::Aggregation { stage: "secagg-shares".into(), message: Envelope::default() })
                    }
                }
            }
        }
        /// The worker's inputs, each arriving at its time, on the virtual
        /// clock; whatever the worker sent is stamped with the clock's time
        /// when the worker next looks at its inbox (nothing moves the clock
        /// between a send and that look).
        struct Scripted {
            clock: Clock,
            script: VecDeque<(Millis, PartyInput)>,
            sent: mpsc::Receiver<pb::PartyMessage>,
            /// The task id of each answer (a result or a failure) and when.
            answers: Vec<(u64, Millis)>,
            /// Once this many answers came and the script is done, the
            /// coordinator goes (the job's sender is dropped).
            expected: usize,
        }
        impl Scripted {
            fn stamp(&mut self) {
                let now = self.clock.load(Ordering::SeqCst);
                while let Ok(m) = self.sent.try_recv() {
                    match m.body {
                        Some(party_message::Body::Result(r)) => self.answers.push((r.task_id, now)),
                        Some(party_message::Body::Failed(f)) => self.answers.push((f.task_id, now)),
                        _ => {}
                    }
                }
            }
        }
        impl WorkerInbox for &mut Scripted {
            fn now(&self) -> Millis {
                self.clock.load(Ordering::SeqCst)
            }
            fn recv(&mut self, wait: Duration) -> Result<(Instant, PartyInput), RecvTimeoutError> {
                self.stamp();
                let now = self.now();
                let wait = wait.as_millis() as Millis;
                if self.script.front().is_some_and(|(at, _)| *at <= now + wait) {
                    let (at, input) = self.script.pop_front().expect("a scripted input");
                    self.clock.store(now.max(at), Ordering::SeqCst);
                    return Ok((Instant::now(), input));
                }
                if self.script.is_empty() && self.answers.len() >= self.expected {
                    return Err(RecvTimeoutError::Disconnected);
                }
                assert!(now + wait < 60_000, "waiting for nothing at {now} ms: {:?}", self.answers);
                self.clock.store(now + wait, Ordering::SeqCst);
                Err(RecvTimeoutError::Timeout)
            }
        }
        let fit = |task_id| {
            let config = confide_algorithms::FitConfig { round: 1, train: Default::default() };
            let global = Arc::new(confide_algorithms::Parameters::default());
            let body = TaskBody::Fit { config, global, round_message: Vec::new() };
            PartyInput::Task(Task { job_id: "j".into(), round: 1, task_id, body })
        };
        let step = |task_id| {
            let body = TaskBody::Aggregation { stage: "secagg-shares".into(), message: Envelope::default() };
            PartyInput::Task(Task { job_id: "j".into(), round: 1, task_id, body })
        };
        // Runs a job whose handler trains `train_ms` and steps `step_ms`,
        // with floor `floor_ms`, through the worker's loop on the scripted
        // `inputs`; returns each answer's task and time, and the time the
        // worker ended.
        let run = |(train_ms, step_ms, refuse_second_fit), floor_ms, inputs: Vec<(Millis, PartyInput)>, expected| {
            let clock = Clock::default();
            let handler = Timed { clock: clock.clone(), train_ms, step_ms, refuse_second_fit };
            let (tx, sent) = mpsc::channel::<pb::PartyMessage>(64);
            let stats = Arc::new(NodeStats::default());
            let outbox = Arc::new(Outbox { tx, stats: stats.clone(), transfer: std::sync::Mutex::new(()) });
            let session = PartySession::new("j", Box::new(handler), 600_000).with_fit_answer_after(Some(floor_ms));
            let metrics = Arc::new(PartyMetrics::new().unwrap());
            let to = Sent { outbox, limits: Limits::default(), stats, metrics };
            let mut inbox =
                Scripted { clock: clock.clone(), script: inputs.into(), sent, answers: Vec::new(), expected };
            run_job("j".into(), session, &mut inbox, to);
            inbox.stamp();
            (inbox.answers, clock.load(Ordering::SeqCst))
        };
        // Queued fits: each answer one floor after its fit was taken up.
        let queued = |train_ms| run((train_ms, 0, true), 1_200, vec![(0, fit(1)), (0, fit(2))], 2).0;
        assert_eq!(queued(300), vec![(1, 1_200), (2, 2_400)]);
        assert_eq!(queued(800), vec![(1, 1_200), (2, 2_400)]);
        // A fit behind a slow step: its floor starts when the step ends.
        let behind = |train_ms| run((train_ms, 500, false), 1_200, vec![(0, step(1)), (0, fit(2))], 2).0;
        assert_eq!(behind(100), vec![(1, 500), (2, 1_700)]);
        assert_eq!(behind(600), vec![(1, 500), (2, 1_700)]);
        // A fit that trains past its floor is answered when it is done.
        assert_eq!(run((1_500, 0, false), 1_200, vec![(0, fit(1))], 1).0, vec![(1, 1_500)]);
        // Closed while the fit's answer is held: no answer, and the close
        // is handled when it comes, not after the floor.
        let closed = PartyInput::Closed { reason: "cancelled".into(), ended: Some("cancelled".into()) };
        let (answers, ended) = run((100, 0, false), 3_000, vec![(0, fit(1)), (400, closed)], 0);
        assert!(answers.is_empty(), "a held answer after the close: {answers:?}");
        assert_eq!(ended, 400, "the close waited for the floor");
    }

    #[test]
    fn two_jobs_results_never_interleave_on_the_shared_stream() {
        use confide_proto::messages::{ResultBody, TaskResult};
        // A one-message queue: every chunk waits for the reader, so two
        // workers sending at once would interleave without the lock.
        let (tx, mut rx) = mpsc::channel::<pb::PartyMessage>(1);
        let stats = Arc::new(NodeStats::default());
        let outbox = Arc::new(Outbox { tx, stats: stats.clone(), transfer: std::sync::Mutex::new(()) });
        let limits = Limits { chunk_bytes: 64, ..Limits::default() };
        let workers: Vec<_> = (1..=2u64)
            .map(|task_id| {
                let (outbox, stats) = (outbox.clone(), stats.clone());
                let to = Sent { outbox, limits, stats, metrics: Arc::new(PartyMetrics::new().unwrap()) };
                std::thread::spawn(move || {
                    for round in 0..5 {
                        let body = ResultBody::SecureSum {
                            contribution: confide_crypto::aggregation::Envelope {
                                body: vec![task_id as u8],
                                bulk: Some(Bulk::Words(vec![task_id as u32; 200])),
                            },
                        };
                        let r = TaskResult { job_id: format!("job-{task_id}"), round, task_id, body };
                        assert!(send(&format!("job-{task_id}"), PartyOutput::Result(r), &to, None));
                    }
                })
            })
            .collect();
        drop(outbox);
        // Each result's chunks follow it, all of its transfer, before the next result.
        let (mut open, mut results, mut chunks) = (None::<u64>, 0, 0);
        while let Some(m) = rx.blocking_recv() {
            match m.body {
                Some(party_message::Body::Result(r)) => {
                    assert_eq!(open, None, "a result started inside another's transfer");
                    open = r.bulk.map(|h| h.transfer_id);
                    results += 1;
                }
                Some(party_message::Body::Chunk(c)) => {
                    assert_eq!(open, Some(c.transfer_id), "a chunk of another transfer");
                    chunks += 1;
                    if c.offset as usize + c.data.len() == 800 {
                        open = None;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        for w in workers {
            w.join().unwrap();
        }
        assert_eq!((results, chunks), (10, 10 * 800usize.div_ceil(64)));
    }

    /// Workers count from their start until their thread ends (not until
    /// their job is closed or replaced), by job.
    #[test]
    fn live_workers_count_until_their_threads_end() {
        let live = LiveWorkers::default();
        let a1 = live.enter("a");
        let a2 = live.enter("a");
        let b = live.enter("b");
        assert_eq!(live.live(), HashMap::from([("a".to_string(), 2), ("b".to_string(), 1)]));
        drop(a1);
        assert_eq!(live.live()["a"], 1);
        drop((a2, b));
        assert!(live.live().is_empty());
        // A worker's thread holds its count until it returns.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let alive = live.enter("c");
        let t = std::thread::spawn(move || {
            let _alive = alive;
            let _ = wait.recv();
        });
        assert_eq!(live.live()["c"], 1);
        go.send(()).unwrap();
        t.join().unwrap();
        assert!(live.live().is_empty());
    }

    /// A coordinator cannot pile tasks up behind a busy worker: a job's
    /// fifth waiting task fails at once, and so does any task once 16 wait
    /// in all; a task taken up makes room again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_waiting_for_busy_workers_are_bounded() {
        use crate::session::{JobHandler, TaskError};
        use confide_proto::messages::{Envelope, ResultBody, Task};
        /// Answers each task once the test lets it.
        struct Gated(std::sync::mpsc::Receiver<()>);
        impl JobHandler for Gated {
            fn on_task(&mut self, _: Task) -> Result<ResultBody, TaskError> {
                let _ = self.0.recv();
                Ok(ResultBody::Aggregation { stage: "secagg-shares".into(), message: Envelope::default() })
            }
        }
        let setup = |job: &str, task_id| pb::Task {
            job_id: job.into(),
            round: 0,
            task_id,
            body: Some(pb::task::Body::Setup(pb::SetupTask {})),
            bulk: None,
        };
        let (tx, mut rx) = mpsc::channel::<pb::PartyMessage>(64);
        let stats = Arc::new(NodeStats::default());
        let outbox = Arc::new(Outbox { tx, stats: stats.clone(), transfer: std::sync::Mutex::new(()) });
        let (permit, gate) = std::sync::mpsc::channel();
        let session = PartySession::new("busy", Box::new(Gated(gate)), 600_000);
        let metrics = Arc::new(PartyMetrics::new().unwrap());
        let mut jobs = HashMap::new();
        let alive = LiveWorkers::default().enter("busy");
        let busy = spawn_job("busy".into(), session, outbox.clone(), Limits::default(), (stats, metrics), alive);
        jobs.insert("busy".to_string(), busy);
        let taken_up = |jobs: &HashMap<String, JobInbox>, waiting| {
            let start = Instant::now();
            while jobs["busy"].queued.load(Ordering::Acquire) != waiting {
                assert!(start.elapsed() < Duration::from_secs(30), "the worker took no task up");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let failures = |rx: &mut mpsc::Receiver<pb::PartyMessage>| {
            let mut failed = Vec::new();
            while let Ok(m) = rx.try_recv() {
                if let Some(party_message::Body::Failed(f)) = m.body {
                    failed.push((f.job_id, f.task_id, f.reason));
                }
            }
            failed
        };
        // Task 1 is taken up (the worker waits in it); 2..=5 wait; 6 fails.
        route(&jobs, &outbox, setup("busy", 1), None).await;
        taken_up(&jobs, 0);
        for task_id in 2..=6 {
            route(&jobs, &outbox, setup("busy", task_id), None).await;
        }
        let failed = failures(&mut rx);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].1, 6);
        assert!(failed[0].2.contains("4 tasks of this job already wait"), "{}", failed[0].2);
        // Task 1 answered, 2 taken up: room for one more.
        permit.send(()).unwrap();
        taken_up(&jobs, 3);
        route(&jobs, &outbox, setup("busy", 7), None).await;
        assert_eq!(failures(&mut rx), []);
        // Three more jobs whose workers take nothing up: 4 + 12 wait, so a
        // fifth job's task fails whatever that job holds.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(std::sync::Mutex::new(released));
        for job in ["j1", "j2", "j3", "j4"] {
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, PartyInput)>();
            let released = released.clone();
            let worker = std::thread::spawn(move || {
                let _inbox = rx;
                let _ = released.lock().unwrap().recv();
            });
            jobs.insert(job.into(), JobInbox { tx, queued: Arc::new(AtomicUsize::new(0)), worker: Some(worker) });
        }
        for job in ["j1", "j2", "j3"] {
            for task_id in 0..4 {
                route(&jobs, &outbox, setup(job, task_id), None).await;
            }
        }
        assert_eq!(failures(&mut rx), []);
        route(&jobs, &outbox, setup("j4", 0), None).await;
        let failed = failures(&mut rx);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!((failed[0].0.as_str(), failed[0].1), ("j4", 0));
        assert!(failed[0].2.contains("16 tasks already wait for this party's workers"), "{}", failed[0].2);
        for _ in 0..8 {
            let _ = permit.send(());
        }
        // A worker that ended holds no room: its waiting tasks are gone.
        drop(release);
        for job in ["j1", "j2", "j3", "j4"] {
            if let Some(w) = jobs.get_mut(job).and_then(|j| j.worker.take()) {
                w.join().unwrap();
            }
        }
        taken_up(&jobs, 0);
        route(&jobs, &outbox, setup("busy", 8), None).await;
        assert!(failures(&mut rx).iter().all(|f| f.1 != 8), "only the busy job's tasks count now");
        drop(jobs);
    }

    #[test]
    fn a_party_delegates_only_to_the_relay_its_config_names() {
        use confide_crypto::pki::{PeerIdentity, Role};
        let id = |name: &str, role| PeerIdentity { name: name.into(), role };
        let url = "https://x:1";
        assert_eq!(relay_to_delegate(None, &id("coordinator", Role::Coordinator), url), Ok(None));
        let edge = id("edge-a", Role::Relay);
        assert_eq!(relay_to_delegate(Some("edge-a"), &edge, url), Ok(Some(edge.clone())));
        let e = relay_to_delegate(None, &edge, url).unwrap_err();
        assert!(e.contains("relay edge-a") && e.contains("relay = \"edge-a\""), "{e}");
        let e = relay_to_delegate(Some("edge-b"), &edge, url).unwrap_err();
        assert!(e.contains("not the configured relay edge-b"), "{e}");
        let e = relay_to_delegate(Some("edge-a"), &id("coordinator", Role::Coordinator), url).unwrap_err();
        assert!(e.contains("names relay edge-a"), "{e}");
        assert!(relay_to_delegate(None, &id("site-2", Role::Party), url).is_err());
        assert!(relay_to_delegate(None, &id("admin", Role::Admin), url).is_err());
    }

    fn node(pki: &PkiDir, name: &str) -> PartyNode {
        node_with(pki, name, |_| {})
    }

    /// [`node`] with `edit` applied to its configuration.
    fn node_with(pki: &PkiDir, name: &str, edit: impl FnOnce(&mut PartyConfig)) -> PartyNode {
        let mut cfg = PartyConfig {
            coordinator: "https://localhost:1".into(),
            server_name: "localhost".into(),
            relay: None,
            ca: pki.ca_cert(),
            cert: pki.party_cert(name),
            key: pki.party_key(name),
            revocation_list: None,
            ledger: None,
            audit_log: None,
            datasets: Default::default(),
            models: Default::default(),
            training: Default::default(),
            policy: Default::default(),
            reconnect: Default::default(),
            limits: Default::default(),
            serve: Default::default(),
            cloud: Default::default(),
            fault: Default::default(),
            metrics: Default::default(),
            warnings: Vec::new(),
        };
        edit(&mut cfg);
        PartyNode::with_plugins(cfg, PartyPlugins::new())
    }

    /// A DP training job of party "a" on data set "bc".
    const DP_JOB_ON_BC: &str = "name = \"p\"\nkind = \"train\"\nrounds = 1\n[parties]\nnames = [\"a\"]\nmin = 1\n\
                                dataset = \"bc\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n\
                                standardize = false\n[dp]\nnoise_multiplier = 1.0\nsampling_rate = 0.05\n";

    /// The CA of one enrolled party, "a", under `dir`.
    fn party_a(dir: &Path) -> PkiDir {
        let pki = PkiDir::new(dir);
        pki.init("t", &["a".into()], &[]).unwrap();
        pki
    }

    /// A data set of one feature read at `path` (a file, or a directory of batches).
    fn one_feature(path: &Path) -> confide_algorithms::data::DatasetSource {
        toml::from_str(&format!("path = {:?}\nfeatures = 1", path.to_str().unwrap())).unwrap()
    }

    /// Party "a" under `dir` with a privacy ledger and data set "bc" of one
    /// feature reading `rows` (written to `bc.csv`), configured further by
    /// `edit`: the node, the ledger's path and the rows' path.
    fn node_on_bc(dir: &Path, rows: &str, edit: impl FnOnce(&mut PartyConfig)) -> (PartyNode, PathBuf, PathBuf) {
        let pki = party_a(dir);
        let (ledger_path, rows_path) = (dir.join("ledger.json"), dir.join("bc.csv"));
        std::fs::write(&rows_path, rows).unwrap();
        let node = node_with(&pki, "a", |cfg| {
            cfg.ledger = Some(ledger_path.clone());
            cfg.datasets.insert("bc".into(), one_feature(&rows_path));
            edit(cfg);
        });
        (node, ledger_path, rows_path)
    }

    /// `node`'s answer to `offer`, as its message loop would give it.
    fn answer(node: &PartyNode, offer: &pb::JobOffer) -> Result<PartySession, String> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(node.accept(offer, "a"))
    }

    /// A node records, at start, the resolved path each configured data
    /// set reads in the privacy ledger, so that entries written before
    /// ledgers kept paths are charged with the rows' spending under any
    /// later name.
    #[test]
    fn a_starting_node_records_its_data_sets_paths_in_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let pki = party_a(dir.path());
        let ledger_path = dir.path().join("ledger.json");
        let spec = confide_proto::jobspec::JobSpec::parse(DP_JOB_ON_BC, "p", &Limits::default()).unwrap();
        drop(crate::ledger::Ledger::open(&ledger_path).unwrap().reserve("j1", &spec, "bc", None).unwrap());
        assert!(crate::ledger::Ledger::read(&ledger_path).unwrap().datasets["bc"].paths.is_empty());
        let rows = dir.path().join("bc.csv");
        std::fs::write(&rows, "x,label\n1,0\n").unwrap();
        let source: confide_algorithms::data::DatasetSource =
            toml::from_str(&format!("path = {:?}", rows.to_str().unwrap())).unwrap();
        let _node = node_with(&pki, "a", |cfg| {
            cfg.ledger = Some(ledger_path.clone());
            cfg.datasets.insert("bc".into(), source);
        });
        let paths = &crate::ledger::Ledger::read(&ledger_path).unwrap().datasets["bc"].paths;
        let expected = crate::config::resolved_path(&rows).to_string_lossy().into_owned();
        assert_eq!(paths.iter().collect::<Vec<_>>(), [&expected]);
    }

    /// An offer whose job id is not an id (empty, which once meant "no
    /// rounds to count" in the ledger; a NUL, which a worker thread's name
    /// cannot hold; a line break for the logs; or unbounded) is refused
    /// before anything is reserved; the same offer under a real id is
    /// accepted and reserved.
    #[test]
    fn an_offer_whose_job_id_is_not_an_id_is_refused_before_any_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let (node, ledger_path, _) = node_on_bc(dir.path(), "x,label\n1,0\n2,1\n", |_| {});
        let offer = |id: &str| pb::JobOffer { job_id: id.into(), spec_toml: DP_JOB_ON_BC.into(), dataset: "bc".into() };
        for id in ["", "j\0", "j\nforged log line", &"j".repeat(65)] {
            let Err(e) = answer(&node, &offer(id)) else { panic!("{id:?} accepted") };
            assert!(e.contains("job_id") && e.contains("is not a job id"), "{e}");
        }
        assert!(crate::ledger::Ledger::read(&ledger_path).map_or(true, |l| l.datasets.is_empty()));
        let accepted = answer(&node, &offer("j1-ok"));
        assert!(accepted.is_ok(), "{:?}", accepted.err());
        assert!(crate::ledger::Ledger::read(&ledger_path).unwrap().datasets["bc"].jobs.contains_key("j1-ok"));
    }

    /// A model within the spec's check (which counts one input feature) but
    /// over the party's limit at its real width is refused naming the
    /// model and the limit, before anything is reserved or allocated.
    #[test]
    fn a_model_over_the_limit_at_this_partys_width_is_refused_before_any_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let (node, ledger_path, _) = node_on_bc(dir.path(), "x,label\n1,0\n2,1\n", |cfg| {
            cfg.limits.max_values = 100;
            cfg.datasets.get_mut("bc").unwrap().features = Some(60);
        });
        // Logistic regression over 2 classes: 4 values at one feature, 122 at 60.
        let offer = pb::JobOffer { job_id: "j1".into(), spec_toml: DP_JOB_ON_BC.into(), dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("model: at this party's 60 features") && e.contains("122 values"), "{e}");
        assert!(e.contains("limits.max_values"), "{e}");
        assert!(crate::ledger::Ledger::read(&ledger_path).map_or(true, |l| l.datasets.is_empty()), "nothing reserved");
    }

    /// An evaluation that runs outside the budget (a pipeline's, under
    /// `evaluations_outside_budget`) reads its rows strictly, as a job
    /// without DP does; why it could not be set up on them (a malformed
    /// cell) stays in this party's log, as under DP: the policy protects
    /// those rows otherwise.
    #[test]
    fn an_evaluation_outside_the_budget_keeps_its_set_up_errors_here() {
        let dir = tempfile::tempdir().unwrap();
        let pki = party_a(dir.path());
        let batches = dir.path().join("batches");
        std::fs::create_dir(&batches).unwrap();
        std::fs::write(batches.join("001.csv"), "1,0\nsecret-cell,1\n").unwrap();
        let node = node_with(&pki, "a", |cfg| {
            cfg.ledger = Some(dir.path().join("ledger.json"));
            cfg.datasets.insert("w".into(), one_feature(&batches));
            cfg.policy.max_epsilon = Some(4.0);
            cfg.policy.evaluations_outside_budget = true;
            cfg.policy.min_parties = 1;
        });
        let spec = "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"a\"]\nmin = 1\n\
                    dataset = \"w\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n\
                    [pipeline]\njob = \"p1\"\niteration = 1\nservice = \"triage\"\nrows = \"new\"\n";
        let offer = pb::JobOffer { job_id: "e1".into(), spec_toml: spec.into(), dataset: "w".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("in this party's log") && !e.contains("secret-cell"), "{e}");
    }

    /// The hospital's own floor on a DP job's fit answers holds whatever
    /// the spec says (a longer spec floor wins), a DP evaluation's answers
    /// are held to it too, and a job whose round
    /// deadline comes before the floor is refused, naming the setting,
    /// before anything is reserved.
    #[test]
    fn a_dp_jobs_answers_are_held_to_the_policys_floor_too() {
        let dir = tempfile::tempdir().unwrap();
        let (node, ledger_path, _) =
            node_on_bc(dir.path(), "1,0\n2,1\n", |cfg| cfg.policy.min_answer_after_secs = Some(2.0));
        let offer = |id: &str, spec: String| pb::JobOffer { job_id: id.into(), spec_toml: spec, dataset: "bc".into() };
        let floor = |id: &str, spec: String| {
            answer(&node, &offer(id, spec)).map(|s| s.answer_floor().map(|f| (f.stage, f.after)))
        };
        assert_eq!(floor("j1", DP_JOB_ON_BC.into()), Ok(Some(("fit", 2000))), "the spec sets none");
        let with = |t: &str| DP_JOB_ON_BC.replace("[dp]\n", &format!("[dp]\nanswer_fit_after_secs = {t}\n"));
        assert_eq!(floor("j3", with("0.5")), Ok(Some(("fit", 2000))), "a shorter spec floor");
        assert_eq!(floor("j4", with("3.5")), Ok(Some(("fit", 3500))), "a longer spec floor");
        let no_dp = DP_JOB_ON_BC.split("[dp]").next().unwrap().to_string();
        assert_eq!(floor("j5", no_dp), Ok(None), "a job without [dp]");
        let evaluation = "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"a\"]\nmin = 1\n\
                          dataset = \"bc\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n\
                          standardize = false\n[dp]\nnoise_multiplier = 2.0\n";
        assert_eq!(floor("j6", evaluation.into()), Ok(Some(("evaluate", 2000))), "a DP evaluation");
        let before = crate::ledger::Ledger::read(&ledger_path).unwrap();
        let hurried = format!("{DP_JOB_ON_BC}[timeouts]\nround_secs = 2\n");
        let Err(e) = answer(&node, &offer("j2", hurried)) else { panic!("accepted") };
        assert!(e.contains("policy.min_answer_after_secs") && e.contains("round_secs = 2"), "{e}");
        // The offer's own answer is held to the floor: the coordinator
        // must still be recruiting then.
        let short_recruit = format!("{DP_JOB_ON_BC}[timeouts]\nrecruit_secs = 2\n");
        let Err(e) = answer(&node, &offer("j7", short_recruit)) else { panic!("accepted") };
        assert!(e.contains("policy.min_answer_after_secs") && e.contains("recruit_secs = 2"), "{e}");
        let after = crate::ledger::Ledger::read(&ledger_path).unwrap();
        assert!(!after.datasets["bc"].jobs.contains_key("j2"), "nothing reserved for j2");
        assert!(!after.datasets["bc"].jobs.contains_key("j7"), "nothing reserved for j7");
        assert_eq!(before.datasets["bc"].jobs.len(), after.datasets["bc"].jobs.len());
    }

    /// A trainer that records the name of the thread it trains on.
    struct RecordsThread(Arc<std::sync::Mutex<Vec<String>>>);

    impl confide_algorithms::trainer::Trainer for RecordsThread {
        fn parameters(&self) -> Result<confide_algorithms::Parameters, confide_algorithms::Error> {
            confide_algorithms::Parameters::new(vec![confide_algorithms::Tensor {
                name: "w".into(),
                shape: vec![1],
                data: vec![0.0],
            }])
        }
        fn set_parameters(&mut self, _: &confide_algorithms::Parameters) -> Result<(), confide_algorithms::Error> {
            Ok(())
        }
        fn feature_stats(&self) -> confide_algorithms::FeatureStats {
            Default::default()
        }
        fn fit(
            &mut self,
            _: &confide_algorithms::trainer::FitConfig,
        ) -> Result<confide_algorithms::FitOutcome, confide_algorithms::Error> {
            let name = std::thread::current().name().unwrap_or("unnamed").to_owned();
            self.0.lock().unwrap().push(name);
            Ok(confide_algorithms::FitOutcome { num_examples: 2, metrics: Default::default() })
        }
        fn evaluate(&mut self) -> Result<confide_algorithms::EvalOutcome, confide_algorithms::Error> {
            Err(confide_algorithms::Error::InvalidInput("not in this test".into()))
        }
        fn predict(&self, _: &[f32]) -> Result<Vec<f32>, confide_algorithms::Error> {
            Err(confide_algorithms::Error::InvalidInput("not in this test".into()))
        }
        fn supports_dp_sgd(&self) -> bool {
            true
        }
        fn fit_private(
            &mut self,
            config: &confide_algorithms::trainer::FitConfig,
            _: &confide_algorithms::trainer::DpSgdPlan,
        ) -> Result<confide_algorithms::FitOutcome, confide_algorithms::Error> {
            self.fit(config)
        }
    }

    impl crate::trainers::TrainerFactory for RecordsThread {
        fn build(
            &self,
            _: &confide_proto::jobspec::JobSpec,
            _: &confide_algorithms::data::DatasetSource,
            _: &str,
        ) -> Result<Box<dyn confide_algorithms::trainer::Trainer>, String> {
            Ok(Box::new(RecordsThread(self.0.clone())))
        }
    }

    /// The node wires a DP job's answer floor to its training: under
    /// secure aggregation a party whose fit answers are held to a floor
    /// trains inside the fit task (when its masked input went out would
    /// otherwise tell how long training took), and one without a floor
    /// trains on a thread of its own while its keys go out.
    #[test]
    fn a_dp_party_trains_ahead_of_its_secagg_keys_only_without_an_answer_floor() {
        use confide_crypto::aggregation::secagg::SecAggPlus;
        use confide_crypto::aggregation::{AggregationProtocol, RoundInfo};
        let threads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spec = DP_JOB_ON_BC
            .replace("names = [\"a\"]\nmin = 1", "names = [\"a\", \"b\", \"c\"]\nmin = 3")
            .replace("[dp]\n", "[aggregation]\nprotocol = \"secagg\"\n[dp]\n");
        // (job, the spec's floor, the hospital's policy floor, the training
        // thread: `None` for the task's own)
        let cases = [
            ("j1", "", None, Some("confide-train")),
            ("j2", "answer_fit_after_secs = 1\n", None, None),
            ("j3", "", Some(1.0), None),
        ];
        for (job, floor, policy_floor, trained_on) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (mut node, _, _) = node_on_bc(dir.path(), "1,0\n2,1\n", |cfg| {
                cfg.policy.aggregation = vec!["secagg".into()];
                cfg.policy.min_answer_after_secs = policy_floor;
            });
            let factory: Arc<dyn crate::trainers::TrainerFactory> = Arc::new(RecordsThread(threads.clone()));
            node.trainers = factory;
            threads.lock().unwrap().clear();
            let toml = spec.replace("[dp]\n", &format!("[dp]\n{floor}"));
            let offer = pb::JobOffer { job_id: job.into(), spec_toml: toml.clone(), dataset: "bc".into() };
            let mut session = answer(&node, &offer).unwrap();
            // The coordinator's side begins round 1 with the spec's own facts.
            let parsed = confide_proto::jobspec::JobSpec::parse(&toml, "offer", &Limits::default()).unwrap();
            let facts = parsed.facts(job, &Limits::default());
            let verifier = Box::new(confide_crypto::secagg::testing::InsecureTagVerifier);
            let mut server = SecAggPlus.server(&toml::Table::new(), &facts, verifier).unwrap();
            let parties: Vec<String> = ["a", "b", "c"].map(String::from).into();
            let global =
                Arc::new(confide_algorithms::trainer::Trainer::parameters(&RecordsThread(threads.clone())).unwrap());
            let fit = confide_algorithms::trainer::FitConfig { round: 1, train: Default::default() };
            let info = RoundInfo { round: 1, parties: &parties, global: &global, fit: Some(&fit) };
            let round_message = server.begin_round(&info).unwrap();
            let body = confide_proto::messages::TaskBody::Fit { config: fit.clone(), global, round_message };
            let task = confide_proto::messages::Task { job_id: job.into(), round: 1, task_id: 1, body };
            let caller = std::thread::current().name().unwrap_or("unnamed").to_owned();
            session.handle(0, crate::session::PartyInput::Task(task));
            // The answer's floor, if any, is the session's; what matters
            // here is where the training ran.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while threads.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let seen = threads.lock().unwrap().clone();
            let expected = trained_on.map_or(caller, str::to_owned);
            assert_eq!(seen, [expected], "job {job} ({floor:?}, policy {policy_floor:?})");
            assert_eq!(session.answer_floor().is_some(), trained_on.is_none());
        }
    }

    /// Data sets that came to read the same rows while the party runs (a
    /// hard link made after start) are caught at the next offer: it is
    /// refused, without the local paths, before anything is reserved.
    #[test]
    fn an_offer_is_refused_once_two_data_sets_read_the_same_rows() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("copy.csv");
        let (node, ledger_path, rows) = node_on_bc(dir.path(), "x,label\n1,0\n2,1\n", |cfg| {
            cfg.datasets.insert("other".into(), one_feature(&link));
        });
        std::fs::hard_link(&rows, &link).unwrap();
        let offer = pb::JobOffer { job_id: "j1".into(), spec_toml: DP_JOB_ON_BC.into(), dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("read the same rows") && !e.contains("copy.csv"), "{e}");
        assert!(crate::ledger::Ledger::read(&ledger_path).map_or(true, |l| l.datasets.is_empty()));
        std::fs::remove_file(&link).unwrap();
        assert!(answer(&node, &offer).is_ok(), "accepted once the link is gone");
    }

    /// An offer runs the spec only on the data set the spec gives this party,
    /// and only to a party it names: one naming another of the hospital's
    /// data sets, or a spec that does not name this party, is refused
    /// before any reservation.
    #[test]
    fn an_offer_on_another_data_set_or_to_a_party_the_spec_does_not_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.csv");
        std::fs::write(&other, "x,label\n3,0\n4,1\n").unwrap();
        let (node, ledger_path, _) = node_on_bc(dir.path(), "x,label\n1,0\n2,1\n", |cfg| {
            cfg.datasets.insert("other".into(), one_feature(&other));
        });
        let offer = pb::JobOffer { job_id: "j1".into(), spec_toml: DP_JOB_ON_BC.into(), dataset: "other".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("\"other\"") && e.contains("gives this party \"bc\""), "{e}");
        let elsewhere = DP_JOB_ON_BC.replace("names = [\"a\"]", "names = [\"b\"]");
        let offer = pb::JobOffer { job_id: "j2".into(), spec_toml: elsewhere, dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("does not name this party"), "{e}");
        assert!(crate::ledger::Ledger::read(&ledger_path).map_or(true, |l| l.datasets.is_empty()));
        let offer = pb::JobOffer { job_id: "j3".into(), spec_toml: DP_JOB_ON_BC.into(), dataset: "bc".into() };
        assert!(answer(&node, &offer).is_ok(), "the spec's own offer is accepted");
    }

    /// An honest coordinator offers the spec it resolved, with the noise
    /// multiplier; an offer with `target_epsilon` alone would have the
    /// party search for the noise itself (with the PLD accountant, grids
    /// that take seconds a step) on its one acceptance slot. Refused from
    /// the text, naming the field, before any reservation (found by review).
    #[test]
    fn an_offer_asking_the_party_to_calibrate_its_noise_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (node, ledger_path, _) = node_on_bc(dir.path(), "x,label\n1,0\n2,1\n", |_| {});
        let targeted = DP_JOB_ON_BC.replace("noise_multiplier = 1.0", "target_epsilon = 2.0\naccountant = \"pld\"");
        let offer = pb::JobOffer { job_id: "j1".into(), spec_toml: targeted, dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("dp.noise_multiplier") && e.contains("does not calibrate"), "{e}");
        assert!(crate::ledger::Ledger::read(&ledger_path).map_or(true, |l| l.datasets.is_empty()));
        // Both given (what `to_toml` offers): z is checked against the target.
        let both = DP_JOB_ON_BC.replace("noise_multiplier = 1.0", "noise_multiplier = 1.0\ntarget_epsilon = 100.0");
        let offer = pb::JobOffer { job_id: "j2".into(), spec_toml: both, dataset: "bc".into() };
        assert!(answer(&node, &offer).is_ok(), "a resolved table is accepted");
    }

    /// Under a protocol that hides each party's values (here secure
    /// aggregation, without DP), why a job could not be set up on the rows
    /// stays in the party's log: the refusal quotes no cell. A protocol
    /// that reveals updates gets the reason, but without the cell's
    /// contents (a patient's value) or the data set's local path (found by
    /// review).
    #[test]
    fn a_set_up_refusal_under_a_hiding_protocol_quotes_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let (node, _, rows) = node_on_bc(dir.path(), "1,0\n77-secret \"Jr\",1\n", |cfg| {
            cfg.policy.aggregation = vec!["secagg".into(), "none".into()];
        });
        let spec = |protocol: &str| {
            format!(
                "name = \"p\"\nkind = \"train\"\nrounds = 1\n[parties]\nnames = [\"a\", \"b\", \"c\"]\nmin = 3\n\
                 dataset = \"bc\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n\
                 standardize = false\n[aggregation]\nprotocol = \"{protocol}\"\n"
            )
        };
        let offer = pb::JobOffer { job_id: "j1".into(), spec_toml: spec("secagg"), dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("in this party's log") && !e.contains("77-secret"), "{e}");
        let offer = pb::JobOffer { job_id: "j2".into(), spec_toml: spec("none"), dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains(":2:") && e.contains("value (withheld)") && e.contains("the data set's file"), "{e}");
        assert!(!e.contains("77-secret") && !e.contains("Jr"), "{e}");
        assert!(!e.contains(&rows.parent().unwrap().display().to_string()), "{e}");
        // A label outside the model's classes is named by its file and
        // line, the label itself withheld.
        std::fs::write(&rows, "1,0\n2,7\n").unwrap();
        let offer = pb::JobOffer { job_id: "j3".into(), spec_toml: spec("none"), dataset: "bc".into() };
        let Err(e) = answer(&node, &offer) else { panic!("accepted") };
        assert!(e.contains("the data set's file:2: label (withheld) is outside the model's 2 classes"), "{e}");
        assert!(!e.contains('7'), "{e}");
        assert_eq!(
            withheld_from_rows(r#"x: label "1\"2" is not a number; column 3 value "a" is not"#, &[]),
            "x: label (withheld) is not a number; column 3 value (withheld) is not"
        );
        // An unquoted label too; a bare relative name leaves the words be.
        let (data, file) = (std::path::Path::new("data"), std::path::Path::new("/srv/data/bc.csv"));
        assert_eq!(
            withheld_from_rows(
                "data set \"bc\": /srv/data/bc.csv: label 7 is outside the model's 2 classes",
                &[data, file]
            ),
            "data set \"bc\": the data set's file: label (withheld) is outside the model's 2 classes"
        );
        // A watched directory's batch and a pipeline's scratch file: their
        // names are withheld too (found by review).
        let (dir, scratch) = (std::path::Path::new("/srv/watch"), std::path::Path::new("/etc/confide/a.pipelines"));
        assert_eq!(
            withheld_from_rows(
                "/srv/watch/2026-11-01-ward-7.csv:3: bad cell; /etc/confide/a.pipelines/labelled-triage.csv: too wide",
                &[dir, scratch]
            ),
            "a batch of the data set:3: bad cell; a batch of the data set: too wide"
        );
        // A directory configured with a trailing separator; a name with spaces.
        let slash = std::path::Path::new("/srv/watch/");
        assert_eq!(
            withheld_from_rows("/srv/watch/ward 7 export.CSV is larger than max_bytes", &[slash]),
            "a batch of the data set is larger than max_bytes"
        );
    }

    /// A coordinator that sends an older revocation list (to bring a revoked
    /// peer back), before or after the party restarts, or a list another CA
    /// signed, is refused: the party keeps the newest list it has accepted.
    #[test]
    fn a_coordinator_cannot_roll_back_or_forge_the_revocation_list() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into(), "b".into(), "c".into()], &[]).unwrap();
        let v1 = pki.revoke_party("b", None).unwrap();
        let v2 = pki.revoke_party("c", None).unwrap();
        let a = node(&pki, "a");
        a.accept_revocations(v2.der(), "coordinator").unwrap();
        assert_eq!(a.revocation_list().version(), 2);
        let err = a.accept_revocations(v1.der(), "coordinator").unwrap_err();
        assert!(err.contains("older"), "{err}");
        assert_eq!(a.revocation_list().version(), 2);
        // After a restart the kept list still rules.
        let restarted = node(&pki, "a");
        restarted.load_kept_revocations().unwrap();
        assert_eq!(restarted.revocation_list().version(), 2);
        assert!(restarted.accept_revocations(v1.der(), "coordinator").is_err());
        // A list signed by another CA is refused whatever its version.
        let evil = confide_crypto::pki::FederationCa::generate("evil").unwrap();
        let forged = evil.revoke(&v2, &[1]).unwrap();
        assert!(restarted.accept_revocations(forged.der(), "coordinator").is_err());
        assert_eq!(restarted.revocation_list().version(), 2);
    }
}
