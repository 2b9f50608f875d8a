//! The tokio/tonic side of the coordinator: accepts parties and the admin
//! CLI over mutual TLS, turns party streams into session inputs for the
//! jobs' threads ([`crate::driver`]), and serves the admin API.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use confide_algorithms::Parameters;
use confide_crypto::identity::SharedRevocations;
use confide_crypto::pki::{PkiDir, Role};
use confide_crypto::revocation::Revocations;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::TaskResult;
use confide_proto::pb::admin_service_server::{AdminService, AdminServiceServer};
use confide_proto::pb::party_service_server::{PartyService, PartyServiceServer};
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_proto::status::JobState;
use confide_proto::transfer::{self, Incoming};
use confide_proto::{Limits, VERSION};
use confide_proto::{MAX_ADVERTISED_POLICY, MAX_SERVING_SERVICES};
use futures::Stream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::Error;
use crate::db::Db;
use crate::driver::{self, EncodedTask};
use crate::plugins::Plugins;
use crate::session::{Input, Start};
use crate::telemetry::CoordinatorMetrics;
use crate::tls::{self, Cut, connection_of, peer_certificate, peer_of};
use confide_proto::telemetry::{MetricsConfig, MetricsServer};

/// How the coordinator is set up (`confide coordinator serve`).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Database and model checkpoints.
    pub data_dir: PathBuf,
    /// The federation's PKI directory (`confide certs init`).
    pub pki: PathBuf,
    /// Boundary limits.
    #[serde(default)]
    pub limits: Limits,
    /// How many versions of each job's model are kept.
    #[serde(default)]
    pub models: ModelRetention,
    /// Where Prometheus scrapes `/metrics` (plain HTTP: loopback or a
    /// monitoring network). A config file without `[metrics]` gets
    /// [`default_metrics`]; `listen` absent turns it off.
    #[serde(default = "default_metrics")]
    pub metrics: MetricsConfig,
}

/// The coordinator's default metrics endpoint: loopback, port 9464
/// (Prometheus's exporter-port convention), so nothing is exposed beyond
/// the host unless configured.
pub fn default_metrics() -> MetricsConfig {
    MetricsConfig { listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))), allow_hosts: Vec::new() }
}

/// `[models]` in the coordinator's config.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRetention {
    /// Versions (one per round) of each job's model kept, newest first;
    /// 0 keeps every round's. At least 2 otherwise (a resumed job needs its
    /// latest checkpoint while the next is written).
    pub keep_last: usize,
}

impl Default for ModelRetention {
    fn default() -> Self {
        ModelRetention { keep_last: 10 }
    }
}

/// What goes down a party's stream.
pub enum Outbound {
    /// A small message.
    Msg(coordinator_message::Body),
    /// A task and its bulk vector in chunks, shared by all its recipients.
    Task(Arc<EncodedTask>),
    /// A pulled model (or why it cannot be had), sent as [`pb::ModelPart`]s.
    Model {
        /// The service.
        service: String,
        /// The deployment's sequence.
        sequence: u64,
        /// The safetensors bytes, or the reason for the party.
        bytes: Result<bytes::Bytes, String>,
    },
    /// Ends the stream with this status, behind what was queued before it.
    Close(Status),
}

/// A connected party as [`Hub::connections`] lists it.
pub struct Connection {
    /// The party's name.
    pub party: String,
    /// Its certificate (DER).
    pub certificate: Arc<[u8]>,
    /// The relay carrying its stream, and the relay's certificate.
    pub relay: Option<(String, Arc<[u8]>)>,
}

/// The parties' current streams, by name (shared with [`shut`]'s tasks).
type Parties = Arc<Mutex<HashMap<String, PartyConn>>>;

struct PartyConn {
    conn_id: u64,
    tx: mpsc::Sender<Outbound>,
    /// Ends the stream with a status ahead of whatever its queue holds: a
    /// close whose queue is full, or that waited [`CLOSE_GRACE`] behind it.
    close: oneshot::Sender<Status>,
    /// Resolves (closed) once tonic has dropped the stream's response.
    ended: oneshot::Receiver<()>,
    /// The stream's connection (a relay opens one for each party stream).
    cut: Cut,
    certificate: Arc<[u8]>,
    /// The relay that carries the stream, and its certificate.
    relay: Option<(String, Arc<[u8]>)>,
    /// What its hello said: software version and advertised policy.
    hello: Option<pb::Hello>,
    /// Model pulls waiting to be read for it, one service's newest each,
    /// read one at a time (see [`PullQueue`]).
    pulls: Arc<Mutex<PullQueue>>,
}

/// A stream's model pulls: each reads a whole model on a blocking thread,
/// so they are read one at a time, and of a service's pulls only the
/// newest waits; a party that pulls in a loop without reading holds one
/// thread and one model here, not the blocking pool (review finding).
#[derive(Default)]
struct PullQueue {
    waiting: BTreeMap<String, u64>,
    running: bool,
}

/// Joint-inference requests an edge may have in flight (each answered, or
/// forgotten after its deployment's timeout); an answer is relayed only for
/// one of them, so that no party can fill another's queue with answers it
/// never asked for (review finding).
const MAX_FORWARDS_PER_EDGE: usize = 64;

/// How long a forwarded request waits for its answer here, at most.
const FORWARD_TTL: Duration = Duration::from_secs(120);

/// Services whose cloud keys one party may announce.
const MAX_CLOUD_KEYS_PER_PARTY: usize = 64;

/// A running job: where its inputs go, and who watches its status.
struct JobHandle {
    inputs: std::sync::mpsc::Sender<Routed>,
    /// Per party, how many of its inputs the job's thread has not handled.
    unread: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// Bumped when the job's status changes; closed when the job ends.
    status: watch::Sender<u64>,
    /// The parties its spec names (none: any): only theirs reach it (a
    /// party outside a job could otherwise pile its results up in the
    /// job's inputs).
    parties: Arc<std::collections::BTreeSet<String>>,
}

/// The most inputs of one party that a job may hold unhandled. An honest
/// party has one task of a job at a time (an answer or a failure, besides
/// its answer to the offer); more waiting is a party flooding the job's
/// thread, and its stream is closed. Each can be a whole model, so the
/// bound is small: with the model limit (`limits.max_values`) it bounds
/// what one party can make a busy job hold.
pub(crate) const MAX_UNREAD_PER_PARTY: usize = 8;

/// An input on its way to a job's thread. A party's holds its place in
/// that party's count of the job's unread inputs until the thread has
/// handled it (or dropped it unread).
pub(crate) struct Routed {
    /// The input.
    pub(crate) input: Input,
    _unread: Option<Unread>,
}

impl From<Input> for Routed {
    fn from(input: Input) -> Self {
        Routed { input, _unread: None }
    }
}

/// One unread input in a party's count (see [`Routed`]).
struct Unread(Arc<AtomicUsize>);

impl Drop for Unread {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl JobHandle {
    fn new(inputs: std::sync::mpsc::Sender<Routed>, parties: Arc<std::collections::BTreeSet<String>>) -> Self {
        JobHandle { inputs, unread: Mutex::default(), status: watch::channel(0).0, parties }
    }

    /// `party`'s `input` with its place in the party's unread count, or
    /// `None` when the party has [`MAX_UNREAD_PER_PARTY`] unhandled already.
    fn counted(&self, party: &str, input: Input) -> Option<Routed> {
        let count = lock(&self.unread).entry(party.to_owned()).or_default().clone();
        if count.fetch_add(1, Ordering::AcqRel) >= MAX_UNREAD_PER_PARTY {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Routed { input, _unread: Some(Unread(count)) })
    }
}

/// What the party streams, the admin API and the jobs' threads share.
pub struct Hub {
    db: Db,
    pki: PkiDir,
    /// The newest revocation list, shared with the TLS handshake and every
    /// job's certificate verifier.
    revocations: SharedRevocations,
    limits: Limits,
    models_dir: PathBuf,
    retention: ModelRetention,
    parties: Parties,
    /// Cloud parties' signed keys (joint inference), by (party, service),
    /// relayed to every party with the certificate of the stream they came on.
    cloud_keys: Mutex<HashMap<(String, String), pb::CloudKeyAnnouncement>>,
    /// Joint-inference requests relayed and not yet answered, by (cloud,
    /// edge, request id): until when they are waited for.
    forwards: Mutex<HashMap<(String, String, u64), std::time::Instant>>,
    /// Each service's joint-inference route (its current deployment's cloud
    /// tier), cached; cleared by every deployment.
    joint_routes: Mutex<JointRoutes>,
    /// Each serving party's latest report: requests and rows by source per
    /// service, since that party started.
    serving: Mutex<HashMap<String, Vec<pb::ServiceRows>>>,
    jobs: Mutex<HashMap<String, JobHandle>>,
    /// Each party's budget of stream joins (see [`JoinBudget`]).
    joins: Mutex<JoinBudgets>,
    next_id: AtomicU64,
    plugins: Plugins,
    metrics: CoordinatorMetrics,
}

/// How often one party may open a stream: a burst of
/// [`JoinBudget::BURST`], then one every [`JoinBudget::EVERY`]. Each join
/// replaces the party's stream, tells every running job, and sends the
/// welcome, the revocation list and the cloud keys: a party (its key
/// stolen, or its software looping) reconnecting without pause would make
/// the coordinator do that work without end. An honest party backs off
/// after a refused join.
#[derive(Debug, Clone, Copy)]
struct JoinBudget {
    tokens: f64,
    at: std::time::Instant,
    burst: f64,
    every: Duration,
}

impl JoinBudget {
    const BURST: f64 = 30.0;
    const EVERY: Duration = Duration::from_secs(2);
    /// A relay's own budget, taken before a relayed join's checks (which
    /// read the CA and verify a signature): wide enough for all of a
    /// relay's parties to rejoin at once after a restart, but not for a
    /// relay, or a party behind it, to make the coordinator do that work
    /// without pause (found by review).
    const RELAY_BURST: f64 = 1024.0;
    const RELAY_EVERY: Duration = Duration::from_millis(50);

    /// A full budget of `burst` joins, refilled one every `every`.
    fn full(now: std::time::Instant, burst: f64, every: Duration) -> Self {
        JoinBudget { tokens: burst, at: now, burst, every }
    }

    /// Takes one join at `now`; refused with how long until the next.
    fn take(&mut self, now: std::time::Instant) -> Result<(), Duration> {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() / self.every.as_secs_f64();
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.every.mul_f64(1.0 - self.tokens))
        }
    }
}

/// The join budgets by key, and when idle ones were last forgotten.
#[derive(Debug, Default)]
struct JoinBudgets {
    by_key: HashMap<String, JoinBudget>,
    pruned_at: Option<std::time::Instant>,
}

impl JoinBudgets {
    /// Budgets kept before idle ones are forgotten; past it (all of them
    /// recent) a relay member's name gets no budget of its own.
    const MANY: usize = 10_000;
}

/// The refusal of a join beyond `who`'s budget of `burst`, with the wait
/// also as metadata, read by the party's reconnect loop.
fn too_often(who: &str, burst: f64, wait: Duration) -> Status {
    let refused = Status::resource_exhausted(format!(
        "{who} opened {burst} streams without pause; retry in {} ms",
        wait.as_millis().max(1)
    ));
    confide_proto::net::with_retry_after(refused, wait)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// A hub with no stream, job or key yet: `store` is the limits, the
    /// models' directory and how many versions it keeps.
    fn new(
        db: Db,
        pki: PkiDir,
        revocations: SharedRevocations,
        store: (Limits, PathBuf, ModelRetention),
        plugins: Plugins,
    ) -> Result<Hub, Error> {
        let (limits, models_dir, retention) = store;
        Ok(Hub {
            db,
            pki,
            revocations,
            limits,
            models_dir,
            retention,
            parties: Parties::default(),
            serving: Mutex::default(),
            cloud_keys: Mutex::default(),
            forwards: Mutex::default(),
            joint_routes: Mutex::default(),
            jobs: Mutex::new(HashMap::new()),
            joins: Mutex::default(),
            next_id: AtomicU64::new(1),
            plugins,
            metrics: CoordinatorMetrics::new().map_err(|e| Error::Io(format!("metrics: {e}")))?,
        })
    }

    /// One join from the budget kept under `key` (made with `burst` and
    /// `every` when new). Budgets untouched for ten minutes (full again by
    /// then) are forgotten once there are [`JoinBudgets::MANY`], at most
    /// once a second (each time is a pass over all of them, under the lock
    /// every join takes). A key that is new while the map is still full
    /// gets a budget only if `always` (parties' and relays' own names,
    /// which certificates bound): `None` otherwise, so names a relay makes
    /// up can neither grow the map nor make every join scan it (found by
    /// review).
    fn take_budget(&self, key: String, burst: f64, every: Duration, always: bool) -> Option<Result<(), Duration>> {
        let now = std::time::Instant::now();
        let mut joins = lock(&self.joins);
        let due = joins.pruned_at.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1));
        if joins.by_key.len() >= JoinBudgets::MANY && due {
            joins.by_key.retain(|_, b| now.saturating_duration_since(b.at) < Duration::from_secs(600));
            joins.pruned_at = Some(now);
        }
        let full = joins.by_key.len() >= JoinBudgets::MANY;
        match joins.by_key.get_mut(&key) {
            Some(b) => Some(b.take(now)),
            None if full && !always => None,
            None => Some(joins.by_key.entry(key).or_insert_with(|| JoinBudget::full(now, burst, every)).take(now)),
        }
    }

    /// One more relayed join through `relay`, within the budget of the
    /// member its certificate claims to be (`claimed`, checked after: the
    /// budget is the relay's and that name's together, so a member that
    /// loops spends only its own), then the relay's own [`JoinBudget`]
    /// (both kept apart from parties' by names no party has).
    fn take_relayed_join(&self, relay: &str, claimed: Option<&str>) -> Result<(), Status> {
        // Only a name a party could have (the rest fail the certificate's
        // checks anyway); with no room for its budget, the relay's alone.
        if let Some(name) = claimed.filter(|n| confide_crypto::pki::validate_party_name(n).is_ok()) {
            let key = format!("relay {relay} member {name}");
            if let Some(taken) = self.take_budget(key, JoinBudget::BURST, JoinBudget::EVERY, false) {
                taken.map_err(|wait| too_often(&format!("{name} (through relay {relay})"), JoinBudget::BURST, wait))?;
            }
        }
        let (burst, every) = (JoinBudget::RELAY_BURST, JoinBudget::RELAY_EVERY);
        let taken = self.take_budget(format!("relay {relay}"), burst, every, true).unwrap_or(Ok(()));
        taken.map_err(|wait| {
            warn!(relay, "refused a relayed stream: the relay opens streams too often");
            too_often(&format!("relay {relay}"), burst, wait)
        })
    }

    /// One more stream join of `party`, within its [`JoinBudget`].
    fn take_join(&self, party: &str) -> Result<(), Status> {
        let taken = self.take_budget(party.to_owned(), JoinBudget::BURST, JoinBudget::EVERY, true).unwrap_or(Ok(()));
        taken.map_err(|wait| {
            warn!(party, "refused a stream: the party reconnects too often");
            too_often(party, JoinBudget::BURST, wait)
        })
    }

    /// The coordinator's Prometheus metrics.
    pub fn metrics(&self) -> &CoordinatorMetrics {
        &self.metrics
    }

    /// Sets the gauges read off state, before a scrape.
    fn refresh_metrics(&self) {
        let enrolled = self.pki.enrolled().unwrap_or_default();
        let connected: Vec<String> = lock(&self.parties).keys().cloned().collect();
        let jobs = self.db.job_counts().unwrap_or_else(|e| {
            warn!("metrics: cannot count jobs: {e}");
            Vec::new()
        });
        self.metrics.refresh(&enrolled, &connected, &jobs);
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The boundary limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Strategies, protocols and kinds of this build.
    pub fn plugins(&self) -> &Plugins {
        &self.plugins
    }

    /// How many model versions each job keeps.
    pub fn retention(&self) -> ModelRetention {
        self.retention
    }

    /// The federation's PKI directory.
    pub fn pki(&self) -> &PkiDir {
        &self.pki
    }

    /// Records a request from `edge` relayed to `cloud`; false when the
    /// edge already has its most requests waiting.
    /// It is forgotten after `wait` (the deployment's timeout: the edge
    /// answers itself then), and at most [`FORWARD_TTL`].
    fn forwarding(&self, cloud: &str, edge: &str, request_id: u64, wait: Duration) -> bool {
        let mut forwards = lock(&self.forwards);
        let now = std::time::Instant::now();
        forwards.retain(|_, until| *until > now);
        if forwards.keys().filter(|(_, e, _)| e == edge).count() >= MAX_FORWARDS_PER_EDGE {
            return false;
        }
        forwards.insert((cloud.to_owned(), edge.to_owned(), request_id), now + wait.min(FORWARD_TTL));
        true
    }

    /// Takes the record of request `request_id` of `edge` relayed to
    /// `cloud`; false when there is none (never relayed, answered, or
    /// forgotten).
    fn answered(&self, cloud: &str, edge: &str, request_id: u64) -> bool {
        lock(&self.forwards).remove(&(cloud.to_owned(), edge.to_owned(), request_id)).is_some()
    }

    /// The cloud tier of `service`'s current deployment.
    fn joint_route(&self, service: &str) -> Result<Option<confide_proto::deploy::JointConfig>, Error> {
        let generation = {
            let routes = lock(&self.joint_routes);
            if let Some(r) = routes.routes.get(service) {
                return Ok(r.clone());
            }
            routes.generation
        };
        let route = crate::services::joint_route(&self.db, service)?;
        let mut routes = lock(&self.joint_routes);
        // Not if a deployment came while the database was read: the route
        // read may be the one it replaced.
        if routes.generation == generation {
            // Forwards name services (any name a party sends): bounded.
            if routes.routes.len() >= MAX_CACHED_ROUTES {
                routes.routes.clear();
            }
            routes.routes.insert(service.to_owned(), route.clone());
        }
        Ok(route)
    }

    /// Queues a message for every connected party.
    pub fn send_all(&self, body: &coordinator_message::Body) {
        for c in lock(&self.parties).values() {
            let _ = c.tx.try_send(Outbound::Msg(body.clone()));
        }
    }

    /// A deployment was stored: forget cached joint-inference routes and
    /// push it to every party.
    pub fn deployed(&self, msg: pb::ServiceDeployment) {
        {
            let mut routes = lock(&self.joint_routes);
            routes.generation += 1;
            routes.routes.clear();
        }
        self.send_all(&coordinator_message::Body::Deployment(msg));
    }

    /// Where checkpoints go.
    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// Connected parties: name, the certificate of the stream, and the
    /// relay carrying it (name and certificate), if any.
    pub fn connections(&self) -> Vec<Connection> {
        self.numbered_connections().into_iter().map(|(c, _)| c).collect()
    }

    /// Whether a peer's certificate is not revoked today (and, for a party,
    /// still enrolled): the handshake checked it against the lists in force
    /// then, and a connection outlives them.
    fn not_revoked(&self, id: &confide_crypto::pki::PeerIdentity, cert: &[u8]) -> Result<(), Status> {
        let list = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        list.check(&id.name, cert).map_err(|_| {
            warn!(name = %id.name, "refused a request: the certificate of {} is revoked", id.name);
            Status::permission_denied(format!(
                "the certificate of {} is revoked (list version {})",
                id.name,
                list.version()
            ))
        })
    }

    /// [`Hub::not_revoked`], and a party's enrollment.
    async fn still_admitted(&self, id: &confide_crypto::pki::PeerIdentity, cert: &[u8]) -> Result<(), Status> {
        self.not_revoked(id, cert)?;
        // A connection outlives its certificate's expiry too: a stream
        // opened on it later is refused (found by review).
        not_expired(&id.name, cert)?;
        if id.role != Role::Party {
            return Ok(());
        }
        let pki = self.pki.clone();
        let enrolled = tokio::task::spawn_blocking(move || pki.enrolled())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| {
                // The detail (the PKI directory's path) stays in this log.
                warn!("cannot read the enrollment list: {e}");
                Status::internal("the coordinator cannot read its enrollment list")
            })?;
        if !enrolled.contains(&id.name) {
            warn!(party = %id.name, "refused a stream: party {} is no longer enrolled", id.name);
            return Err(Status::permission_denied(format!("party {} is not enrolled", id.name)));
        }
        Ok(())
    }

    /// Every connected party's current stream: name, number and queue.
    fn streams(&self) -> Vec<(String, u64, mpsc::Sender<Outbound>)> {
        lock(&self.parties).iter().map(|(n, c)| (n.clone(), c.conn_id, c.tx.clone())).collect()
    }

    /// [`Hub::connections`] with each stream's number.
    fn numbered_connections(&self) -> Vec<(Connection, u64)> {
        lock(&self.parties)
            .iter()
            .map(|(n, c)| {
                let conn = Connection { party: n.clone(), certificate: c.certificate.clone(), relay: c.relay.clone() };
                (conn, c.conn_id)
            })
            .collect()
    }

    /// Runs `f` on `party`'s stream numbered `conn_id`, if it is still the
    /// party's current one, under the parties' lock: what a stream's
    /// message records is recorded for that stream alone, even when a newer
    /// stream replaces it meanwhile.
    fn on_stream<T>(&self, party: &str, conn_id: u64, f: impl FnOnce(&mut PartyConn) -> T) -> Option<T> {
        lock(&self.parties).get_mut(party).filter(|c| c.conn_id == conn_id).map(f)
    }

    /// Whether `party`'s current stream is the one numbered `conn_id`.
    fn is_current(&self, party: &str, conn_id: u64) -> bool {
        self.on_stream(party, conn_id, |_| ()).is_some()
    }

    /// Queues a message for a party; false if it is not connected or its queue is full.
    pub fn send(&self, party: &str, msg: Outbound) -> bool {
        lock(&self.parties).get(party).is_some_and(|c| c.tx.try_send(msg).is_ok())
    }

    /// Wakes the job's status watchers.
    pub fn job_changed(&self, id: &str) {
        if let Some(j) = lock(&self.jobs).get(id) {
            j.status.send_modify(|v| *v += 1);
        }
    }

    /// The job's thread has ended; its watchers see the channel close.
    pub fn job_ended(&self, id: &str) {
        lock(&self.jobs).remove(id);
        self.metrics.job_ended(id);
    }

    /// Asks job `id` to stop (as `confide job cancel` does).
    pub(crate) fn cancel(&self, id: &str) {
        self.route(id, Input::Cancel);
    }

    /// [`Hub::route`] of a message read from `party`'s stream numbered
    /// `conn_id`, if that is still the party's current stream, under the
    /// parties' lock: a join tells the jobs of the newer stream under the
    /// same lock, so a message of the older one reaches them before that
    /// or not at all (never after the newer stream's join). Whether it was
    /// routed; an error (the stream is to close) when the party has
    /// [`MAX_UNREAD_PER_PARTY`] inputs the job has not handled.
    fn route_from(&self, party: &str, conn_id: u64, job_id: &str, input: Input) -> Result<bool, String> {
        let parties = lock(&self.parties);
        let current = parties.get(party).is_some_and(|c| c.conn_id == conn_id);
        let jobs = lock(&self.jobs);
        match jobs.get(job_id) {
            _ if !current => debug!(party, job = job_id, "a message of a replaced stream; not routed"),
            None => debug!(job = job_id, "message for a job that is not running; ignored"),
            Some(j) if !j.parties.is_empty() && !j.parties.contains(party) => {
                debug!(party, job = job_id, "a message for a job that does not name it; not routed")
            }
            Some(j) => match j.counted(party, input) {
                Some(routed) => {
                    let _ = j.inputs.send(routed);
                }
                None => {
                    return Err(format!(
                        "{MAX_UNREAD_PER_PARTY} of its messages to job {job_id} wait unhandled (an honest party \
                         has one task of a job at a time)"
                    ));
                }
            },
        }
        drop(jobs);
        drop(parties);
        Ok(current)
    }

    /// Whether a result of `party`'s for `job_id` would reach a job: the
    /// job runs and names the party (or names none).
    fn takes_results_from(&self, party: &str, job_id: &str) -> bool {
        lock(&self.jobs).get(job_id).is_some_and(|j| j.parties.is_empty() || j.parties.contains(party))
    }

    fn route(&self, job_id: &str, input: Input) {
        match lock(&self.jobs).get(job_id) {
            Some(j) => {
                let _ = j.inputs.send(input.into());
            }
            None => debug!(job = job_id, "message for a job that is not running; ignored"),
        }
    }

    /// The revocation list in force.
    pub fn revocation_list(&self) -> Revocations {
        self.revocations.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Closes `party`'s stream numbered `conn_id` now, saying why (a newer
    /// stream of the party is left alone); its jobs see it disconnect.
    fn expel(&self, party: &str, conn_id: u64, why: &str, close: Closing) {
        if self.close_stream(party, conn_id, Status::permission_denied(why.to_owned()), close) {
            warn!(party = %party, "closing the stream: {why}");
        }
    }

    /// Takes `party`'s stream numbered `conn_id` out of the hub, if it is
    /// still the party's current one, and ends it with `status` ([`shut`]);
    /// its jobs see the party disconnect. Whether it was.
    fn close_stream(&self, party: &str, conn_id: u64, status: Status, close: Closing) -> bool {
        let conn = {
            let mut parties = lock(&self.parties);
            let that_stream = parties.get(party).is_some_and(|c| c.conn_id == conn_id);
            if !that_stream {
                return false;
            }
            // Its serving counts go with its stream, and so do its requests
            // to cloud parties (it dropped them too: an answer has no use).
            lock(&self.serving).remove(party);
            lock(&self.forwards).retain(|(_, edge, _), _| edge != party);
            self.broadcast(&Input::Disconnected(party.to_owned()));
            parties.remove(party)
        };
        let Some(conn) = conn else { return false };
        shut(conn, party.to_owned(), status, close, self.parties.clone(), SHUT_TIMING);
        let (db, name) = (self.db.clone(), party.to_owned());
        spawn_db(move || db.party_seen(&name, false));
        true
    }

    fn broadcast(&self, input: &Input) {
        for j in lock(&self.jobs).values() {
            let _ = j.inputs.send(input.clone().into());
        }
    }
}

/// A running coordinator.
pub struct RunningCoordinator {
    /// The address it listens on (useful with port 0).
    pub local_addr: SocketAddr,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    _metrics: Option<MetricsServer>,
    shutdown: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningCoordinator {
    /// Stops serving and waits for the server to end.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.join.await;
    }

    /// Waits until the server ends (it normally does not).
    pub async fn wait(self) -> Result<(), Error> {
        match self.join.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Io(format!("server: {e}"))),
            Err(e) => Err(Error::Io(format!("server task: {e}"))),
        }
    }
}

/// The revocation list to put in force at start: the PKI directory's, or
/// the one this coordinator last put in force (kept in its database) when
/// that is newer. A list file that is older, missing, or of the same
/// version but another content (a restored backup, another copy of the
/// directory) would otherwise bring revoked certificates back (found by
/// review); it is reported, not applied.
fn revocations_in_force(pki: &PkiDir, db: &Db) -> Result<Revocations, Error> {
    let from_file = pki.revocations().map_err(|e| Error::InvalidInput(e.to_string()))?;
    let keep = |list: &Revocations| -> Result<(), Error> {
        // (The empty list of a federation that never revoked is not a CRL.)
        if list.version() > 0 { db.keep_revocation_list(list.version(), list.der()) } else { Ok(()) }
    };
    let Some(der) = db.revocation_list()?.filter(|d| !d.is_empty()) else {
        keep(&from_file)?;
        return Ok(from_file);
    };
    let ca_path = pki.ca_cert();
    let ca = std::fs::read(&ca_path).map_err(|e| Error::io(&ca_path, e))?;
    let kept = match Revocations::parse(&der, &ca, "the revocation list kept in the coordinator's database") {
        Ok(kept) => kept,
        // Another CA's (the federation was re-keyed): the file's, whose CA
        // is the one in force. Whoever can replace ca.pem here holds the
        // coordinator's trust anyway.
        Err(e) => {
            warn!("{e}; taking the PKI directory's list instead");
            db.forget_revocation_list()?;
            keep(&from_file)?;
            return Ok(from_file);
        }
    };
    let file = pki.revocation_file();
    if kept.version() > from_file.version() {
        warn!(
            file = %file.display(),
            file_version = from_file.version(),
            kept_version = kept.version(),
            "the revocation list file is older than (or missing beside) the one this coordinator put in force; \
             keeping that one: restore the newest list from the CA's keeper"
        );
        return Ok(kept);
    }
    if kept.version() == from_file.version() && kept.der() != from_file.der() {
        warn!(
            file = %file.display(),
            version = kept.version(),
            "the revocation list file differs from the one of the same version this coordinator put in force; \
             keeping that one"
        );
        return Ok(kept);
    }
    keep(&from_file)?;
    Ok(from_file)
}

/// Starts the coordinator: opens the database, resumes unfinished jobs and
/// serves parties and the admin API until stopped.
pub async fn start(config: CoordinatorConfig) -> Result<RunningCoordinator, Error> {
    start_with(config, Plugins::default()).await
}

/// [`start`] with a build's own strategies, protocols and job kinds.
pub async fn start_with(config: CoordinatorConfig, plugins: Plugins) -> Result<RunningCoordinator, Error> {
    config.limits.validate().map_err(|e| Error::InvalidInput(e.to_string()))?;
    // The checkpoints' directory durable before any checkpoint is written
    // in it (and synced again at every start: an earlier run may have
    // crashed before syncing its entry).
    let models_dir = config.data_dir.join("models");
    confide_proto::durable::create_dirs(&models_dir, &mut |_| {})
        .and_then(|()| confide_proto::durable::sync_parent(&models_dir, &mut |_| {}))
        .map_err(Error::Io)?;
    let db = Db::open(&config.data_dir.join("confide.db"))?;
    db.reset_connections()?;
    let pki = PkiDir::new(&config.pki);
    let tls_config = tls::server_config(&pki)?;
    pki.enrolled()?;
    let revocations: SharedRevocations = Arc::new(RwLock::new(revocations_in_force(&pki, &db)?));
    // Every job checks the parties' certificates and signatures against the
    // federation CA and the revocation list before relaying anything of theirs.
    let ca_path = pki.ca_cert();
    let ca = std::fs::read(&ca_path).map_err(|e| Error::io(&ca_path, e))?;
    confide_crypto::identity::CertVerifier::new(&ca)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", ca_path.display())))?;
    let job_revocations = revocations.clone();
    let plugins = plugins.peer_verifier(move || {
        confide_crypto::identity::CertVerifier::with_revocations(&ca, job_revocations.clone())
            .map(|v| Box::new(v) as Box<dyn confide_crypto::aggregation::PeerVerifier>)
            .map_err(|e| e.to_string())
    });
    let hub =
        Arc::new(Hub::new(db, pki.clone(), revocations.clone(), (config.limits, models_dir, config.models), plugins)?);
    for job in hub.db.unfinished_jobs()? {
        let file = format!("job {}", job.id);
        let spec = match JobSpec::parse_with(&job.spec_toml, &file, &hub.limits, hub.plugins.protocols()) {
            Ok(s) => s,
            Err(e) => {
                hub.db.set_job_state(&job.id, JobState::Failed, Some(&format!("cannot resume: {e}")))?;
                continue;
            }
        };
        // A pipeline's step runs again only if its pipeline still waits for
        // it: the pipeline, resumed, submits the steps it does not (an
        // evaluation, or a training whose id it never recorded), so resuming
        // those too would run a step twice, and a DP step would be charged
        // to the hospitals twice (found by review).
        if let Some(p) = &spec.pipeline
            && !pipeline_waits_for(&hub, &p.job, p.iteration, &job.id)?
        {
            info!(job = %job.id, pipeline = %p.job, "not resumed: its pipeline no longer waits for it");
            hub.db.set_job_state(
                &job.id,
                JobState::Cancelled,
                Some("the coordinator restarted and its pipeline no longer waits for this step (it runs it again)"),
            )?;
            continue;
        }
        // A job whose checkpoint (or starting model) cannot be read fails,
        // naming why; the others resume (one damaged file used to stop the
        // whole coordinator from starting: found by review).
        let start = match job.checkpoint {
            Some(round) => {
                let read = job
                    .model
                    .map(|(_, path)| read_model(&path))
                    .transpose()
                    .and_then(|model| driver::read_state(job.state.as_deref()).map(|state| (model, state)));
                match read {
                    Ok((model, state)) => {
                        info!(job = %job.id, round, "resuming job from its checkpoint");
                        Start::Resume { round, model, state, parties: job.parties }
                    }
                    Err(e) => {
                        warn!(job = %job.id, "cannot resume: its checkpoint of round {round}: {e}");
                        let why = format!("cannot resume: its checkpoint of round {round}: {e}");
                        hub.db.set_job_state(&job.id, JobState::Failed, Some(&why))?;
                        continue;
                    }
                }
            }
            // Before its first checkpoint a job starts again from the model
            // it started from, not from its `from_job`'s newest by now.
            None => match initial_model(&hub, &spec, job.from_round) {
                Ok(model) => {
                    log_start(&job.id, &spec, model.as_ref().map(|(r, _)| *r));
                    Start::Fresh { model: model.map(|(_, m)| m) }
                }
                Err(e) => {
                    warn!(job = %job.id, "cannot resume: its starting model: {e}");
                    hub.db.set_job_state(&job.id, JobState::Failed, Some(&format!("cannot resume: {e}")))?;
                    continue;
                }
            },
        };
        spawn_job(&hub, job.id, spec, start)?;
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listener.local_addr().map_err(|e| Error::Io(e.to_string()))?;
    let metrics = match config.metrics.listen {
        Some(listen) => {
            let h = hub.clone();
            let refresh = Arc::new(move || h.refresh_metrics());
            Some(
                confide_proto::telemetry::serve(
                    listen,
                    config.metrics.allow_hosts.clone(),
                    hub.metrics.registry.clone(),
                    refresh,
                )
                .await
                .map_err(Error::Io)?,
            )
        }
        None => None,
    };
    let incoming = ReceiverStream::new(tls::accept_loop(
        listener,
        tls_config,
        tls::Admission::Coordinator { pki, revocations },
        Some(hub.metrics.tls_refusals()),
    ));
    tokio::spawn(watch_enrollment(hub.clone()));
    let max = hub.limits.max_message_bytes;
    let party_svc = PartyServiceServer::new(PartySvc { hub: hub.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let admin_svc = AdminServiceServer::new(AdminSvc { hub: hub.clone() })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let join = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            // A party uses one stream, a relay one connection per party, the
            // CLI a few calls: a bound on what one connection can hold open
            // (streams a party opens and never reads, see `shut`).
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            // Room for a whole update in flight (see `confide_proto::net`).
            .initial_stream_window_size(confide_proto::net::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(confide_proto::net::HTTP2_CONNECTION_WINDOW)
            .max_frame_size(confide_proto::net::HTTP2_MAX_FRAME)
            .add_service(party_svc)
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            }),
    );
    info!(%local_addr, "coordinator listening (mutual TLS 1.3)");
    let metrics_addr = metrics.as_ref().map(|m| m.local_addr);
    if let Some(addr) = metrics_addr {
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    Ok(RunningCoordinator { local_addr, metrics_addr, _metrics: metrics, shutdown: Some(shutdown_tx), join })
}

/// A job id an administrator's request names, refused (bounded in the
/// error) when it is not one, before it is looked up or echoed (found by
/// review: errors echoed it whole, up to a message's size).
fn admin_job_id(id: &str) -> Result<(), Status> {
    confide_proto::validate_job_id(id).map_err(Status::invalid_argument)
}

fn read_model(path: &Path) -> Result<Parameters, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Parameters::from_safetensors(&bytes)?)
}

/// The starting model of a job with `from_job`, and its round: the round
/// recorded when the job was submitted (`from_round`) or, at submission,
/// the newest.
fn initial_model(hub: &Hub, spec: &JobSpec, from_round: Option<u32>) -> Result<Option<(u32, Parameters)>, Error> {
    let Some(from) = &spec.from_job else {
        return Ok(None);
    };
    let found = match from_round {
        Some(round) => hub.db.model_version(from, round)?.map(|v| (round, v.path)).ok_or_else(|| {
            Error::InvalidInput(format!("from_job: the model of job {from} round {round} is no longer kept"))
        })?,
        None => hub
            .db
            .model_of(from)?
            .ok_or_else(|| Error::InvalidInput(format!("from_job: job {from} has no model yet")))?,
    };
    Ok(Some((found.0, read_model(&found.1)?)))
}

/// Says where a job with `from_job` starts (a resumed one too).
pub(crate) fn log_start(id: &str, spec: &JobSpec, from_round: Option<u32>) {
    if let (Some(from), Some(round)) = (&spec.from_job, from_round) {
        info!(job = %id, "starts from job {from}'s model of round {round}");
    }
}

/// Starts job `id` on a thread of its own: a session, or a pipeline,
/// as its kind says.
pub(crate) fn spawn_job(hub: &Arc<Hub>, id: String, spec: JobSpec, start: Start) -> Result<(), Error> {
    let (tx, rx) = std::sync::mpsc::channel();
    let parties = Arc::new(spec.parties.names.iter().cloned().collect());
    let handle = JobHandle::new(tx, parties);
    lock(&hub.jobs).insert(id.clone(), handle);
    let (hub2, id2) = (hub.clone(), id.clone());
    let driver = hub.plugins.kind(spec.kind.as_str()).map_or(crate::jobs::Driver::Session, |k| k.driver());
    let spawned = std::thread::Builder::new().name(format!("coord-{id}")).spawn(move || match driver {
        crate::jobs::Driver::Pipeline => crate::pipeline::run(hub2, id2, spec, rx),
        _ => driver::run_job(hub2, id2, Arc::new(spec), start, rx),
    });
    if let Err(e) = spawned {
        hub.job_ended(&id);
        return Err(Error::Io(format!("cannot start a thread for job {id}: {e}")));
    }
    Ok(())
}

struct PartySvc {
    hub: Arc<Hub>,
}

/// A streaming response of the party or admin service.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl PartyService for PartySvc {
    type JoinStream = BoxStream<pb::CoordinatorMessage>;

    async fn join(&self, req: Request<Streaming<pb::PartyMessage>>) -> Result<Response<Self::JoinStream>, Status> {
        let id = peer_of(&req)?;
        let shown = peer_certificate(&req)?;
        let connection = connection_of(&req)?.cut.clone();
        let hub = self.hub.clone();
        // A party's join budget first, before the checks that read files:
        // its name is the CA's, so a storm costs no more than this.
        if id.role == Role::Party {
            hub.take_join(&id.name)?;
        }
        // The handshake checked the certificate against the lists in force
        // then; a connection outlives them (HTTP/2 opens a stream on it at
        // will), so each stream is checked again against today's.
        hub.still_admitted(&id, &shown).await?;
        let (name, certificate, relay): (String, Arc<[u8]>, Option<(String, Arc<[u8]>)>) = match id.role {
            // Given to the jobs' aggregation protocols, e.g. for SecAgg+ to
            // relay with the party's keys so that peers verify its signature
            // against the CA themselves.
            Role::Party => (id.name, shown, None),
            Role::Relay => {
                let relay = id.name;
                let hub2 = hub.clone();
                // The name the member's certificate claims (parsed, not yet
                // checked): its own budget at this relay comes first.
                let claimed = req
                    .metadata()
                    .get_bin(RELAYED_CERT)
                    .and_then(|v| v.to_bytes().ok())
                    .filter(|c| c.len() <= 16 << 10)
                    .and_then(|c| confide_crypto::pki::peer_identity(&c).ok())
                    .map(|i| i.name);
                hub.take_relayed_join(&relay, claimed.as_deref())?;
                let (meta, relay2) = (req.metadata().clone(), relay.clone());
                let admitted = tokio::task::spawn_blocking(move || admit_relayed(&hub2, &relay2, &meta))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                let (name, cert) = admitted
                    .and_then(|(name, cert)| not_expired(&name, &cert).map(|()| (name, cert)))
                    .inspect_err(|s| {
                    warn!(relay = %relay, "refused a stream through the relay: {}", s.message());
                })?;
                hub.take_join(&name)?;
                info!(relay = %relay, party = %name, "party connecting through a relay");
                (name, Arc::from(cert), Some((relay, shown)))
            }
            _ => return Err(Status::permission_denied(format!("{} is not a party certificate", id.name))),
        };
        let inbound = req.into_inner();
        let (resp_tx, resp_rx) = mpsc::channel::<Result<pb::CoordinatorMessage, Status>>(16);
        let (out_tx, out_rx) = mpsc::channel::<Outbound>(256);
        let conn_id = hub.next_id.fetch_add(1, Ordering::Relaxed);
        let via = relay.as_ref().map(|(r, _)| r.clone());
        // The welcome goes first on this stream's own queue (by name, two
        // joins racing under one name could both welcome the newer stream,
        // which a party refuses). Its revocation list is read under the
        // parties' lock, as the stream joins them: a newer list published
        // meanwhile is then pushed to this stream too (the revocation watcher
        // stores a list, then sends it to the streams it finds there).
        let mut welcome = pb::Welcome {
            party: name.clone(),
            software_version: VERSION.into(),
            max_message_bytes: hub.limits.max_message_bytes as u64,
            max_values: hub.limits.max_values as u64,
            revocations: None,
        };
        let own;
        let (close, closed) = oneshot::channel();
        let (dropped, ended) = oneshot::channel();
        let previous = {
            let mut parties = lock(&hub.parties);
            // (The list's DER alone, not a clone of its serials.)
            let crl = hub.revocations.read().unwrap_or_else(|p| p.into_inner()).der().to_vec();
            welcome.revocations = Some(pb::RevocationList { crl });
            let welcome = Outbound::Msg(coordinator_message::Body::Welcome(welcome));
            // A fresh queue of 256 with no other sender yet: it has room.
            let _ = out_tx.try_send(welcome);
            own = out_tx.downgrade();
            let conn = PartyConn {
                conn_id,
                tx: out_tx,
                close,
                ended,
                cut: connection,
                certificate: certificate.clone(),
                relay,
                hello: None,
                pulls: Arc::default(),
            };
            let previous = parties.insert(name.clone(), conn);
            // Under the parties' lock, as every change of a party's stream
            // is told: a close racing with this join cannot tell the jobs
            // of a disconnection after this connection.
            if previous.is_some() {
                hub.broadcast(&Input::Disconnected(name.clone()));
            }
            hub.broadcast(&Input::Connected { party: name.clone(), certificate, relay: via });
            previous
        };
        if let Some(previous) = previous {
            info!(party = %name, "party reconnected; the older stream is closed");
            let replaced = Status::aborted("replaced by a newer stream of the party");
            shut(previous, name.clone(), replaced, Closing::BehindItsQueue, hub.parties.clone(), SHUT_TIMING);
        }
        let (sent, received) = hub.metrics.stream_counters(&name);
        tokio::spawn(writer(out_rx, resp_tx, hub.limits.chunk_bytes, sent));
        let db_hub = hub.clone();
        let (db_name, replay) = (name.clone(), own.clone());
        spawn_db(move || {
            db_hub.db.party_seen(&db_name, true)?;
            // To this stream (not by name: a newer stream gets its own).
            let Some(replay) = replay.upgrade() else { return Ok(()) };
            // The services' current deployments: a party that serves one
            // pulls its model if it does not hold it yet.
            for d in crate::services::current_deployments(&db_hub.db)? {
                let _ = replay.try_send(Outbound::Msg(coordinator_message::Body::Deployment(d)));
            }
            let keys: Vec<pb::CloudKeyAnnouncement> = lock(&db_hub.cloud_keys).values().cloned().collect();
            for k in keys {
                let _ = replay.try_send(Outbound::Msg(coordinator_message::Body::CloudKey(k)));
            }
            Ok(())
        });
        info!(party = %name, "party connected");
        drop(own);
        tokio::spawn(reader(hub, name, conn_id, inbound, received));
        Ok(Response::new(Box::pin(Closable::new(closed, resp_rx, dropped))))
    }
}

/// How a stream's close goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Behind what is queued (see [`shut`]).
    BehindItsQueue,
    /// At once: what is queued is not for a party that may no longer have it
    /// (its own certificate revoked).
    AheadOfItsQueue,
}

/// Ends a stream that left the hub (closed, or replaced by a newer stream
/// of the party), in steps until it has ended: its close `status` behind
/// what is queued (unless `closing` says otherwise), so that what the
/// party was sent first (the revocation list that revokes its relay, say)
/// reaches it; ahead of its queue if the queue is full or after
/// [`CLOSE_GRACE`]; and, after [`CUT_AFTER`] more,
/// its connection cut (a party that stops reading holds the stream open
/// otherwise; see [`tls::Conn`]) once no current stream of `parties` uses
/// that connection (a reconnect on it), checked again every `timing.cut_after`
/// until the stream ends.
fn shut(conn: PartyConn, party: String, status: Status, closing: Closing, parties: Parties, timing: ShutTiming) {
    let PartyConn { tx, close, mut ended, cut, .. } = conn;
    let queued = closing == Closing::BehindItsQueue && tx.try_send(Outbound::Close(status.clone())).is_ok();
    // The queue's sender goes now: the writer ends once the stream does.
    drop(tx);
    tokio::spawn(async move {
        if queued && tokio::time::timeout(timing.grace, &mut ended).await.is_ok() {
            return;
        }
        let _ = close.send(status);
        cut_once_unused(&party, &mut ended, &cut, timing.cut_after, || {
            lock(&parties).values().any(|c| c.cut.same(&cut))
        })
        .await;
    });
}

/// The last step of ending a stream whose close went ahead of its queue
/// (the coordinator's [`shut`], the relay's own): waits `every` for the
/// stream to end (`ended` resolves), and if it has not, cuts its
/// connection, unless `in_use` says a current stream uses that connection
/// (a reconnect on it), in which case it waits and checks again.
pub(crate) async fn cut_once_unused(
    party: &str,
    ended: &mut oneshot::Receiver<()>,
    cut: &Cut,
    every: Duration,
    in_use: impl Fn() -> bool,
) {
    let mut spared = false;
    while tokio::time::timeout(every, &mut *ended).await.is_err() {
        if in_use() {
            if !spared {
                warn!(party = %party, "a closed stream has not ended; its connection carries a current one");
                spared = true;
            }
            continue;
        }
        warn!(party = %party, "the party does not read its closed stream; cutting its connection");
        cut.cut();
        return;
    }
}

/// How long [`shut`] waits at each step.
#[derive(Clone, Copy)]
struct ShutTiming {
    /// A close queued behind the stream's queue, before it goes ahead.
    grace: Duration,
    /// A close sent ahead, before the connection is cut.
    cut_after: Duration,
}

const SHUT_TIMING: ShutTiming = ShutTiming { grace: CLOSE_GRACE, cut_after: CUT_AFTER };

/// A party stream's messages, which a close ([`PartyConn::close`]) ends at
/// once with its status, ahead of any message still queued: a stream whose
/// queue is full (a party that does not read) is closed all the same.
pub(crate) struct Closable {
    /// `None` once it fired or its sender went (the stream was replaced or
    /// left the hub: its messages then end as its queue drains).
    closed: Option<oneshot::Receiver<Status>>,
    messages: ReceiverStream<Result<pb::CoordinatorMessage, Status>>,
    /// The close was sent: nothing follows it.
    ended: bool,
    /// Dropped with the stream: tells [`shut`] that the stream has ended.
    _dropped: oneshot::Sender<()>,
}

impl Closable {
    pub(crate) fn new(
        closed: oneshot::Receiver<Status>,
        messages: mpsc::Receiver<Result<pb::CoordinatorMessage, Status>>,
        dropped: oneshot::Sender<()>,
    ) -> Self {
        Closable { closed: Some(closed), messages: ReceiverStream::new(messages), ended: false, _dropped: dropped }
    }
}

impl Stream for Closable {
    type Item = Result<pb::CoordinatorMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(closed) = self.closed.as_mut()
            && let Poll::Ready(status) = Pin::new(closed).poll(cx)
        {
            self.closed = None;
            if let Ok(status) = status {
                // What is queued behind the close is dropped (and the
                // writer, its sender, ends).
                self.ended = true;
                self.messages.close();
                return Poll::Ready(Some(Err(status)));
            }
        }
        Pin::new(&mut self.messages).poll_next(cx)
    }
}

/// Metadata a relay sends with a stream it opens for a party (see
/// [`confide_crypto::relay`]).
pub const RELAYED_CERT: &str = "confide-party-cert-bin";
/// The party's delegation signature.
pub const RELAYED_SIGNATURE: &str = "confide-delegation-bin";
/// The delegation's time, Unix seconds.
pub const RELAYED_TIME: &str = "confide-delegation-time";
/// The delegation's nonce.
pub const RELAYED_NONCE: &str = "confide-delegation-nonce-bin";

/// Admits a stream a relay opens for a party: the party's certificate is the
/// federation's (not revoked), the party is enrolled, and it signed a
/// recent delegation to this relay. Returns its name and certificate.
fn admit_relayed(hub: &Hub, relay: &str, meta: &tonic::metadata::MetadataMap) -> Result<(String, Vec<u8>), Status> {
    let bin = |key: &str| -> Result<Vec<u8>, Status> {
        let v = meta
            .get_bin(key)
            .ok_or_else(|| Status::unauthenticated(format!("relay {relay}: no {key} for the party it carries")))?;
        v.to_bytes().map(|b| b.to_vec()).map_err(|_| Status::invalid_argument(format!("relay {relay}: bad {key}")))
    };
    let cert = bin(RELAYED_CERT)?;
    let signature = bin(RELAYED_SIGNATURE)?;
    let nonce = bin(RELAYED_NONCE)?;
    let time: u64 = meta
        .get(RELAYED_TIME)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Status::unauthenticated(format!("relay {relay}: no {RELAYED_TIME}")))?;
    if cert.len() > 16 << 10 || signature.len() > 512 {
        return Err(Status::invalid_argument(format!("relay {relay}: an oversized certificate or delegation")));
    }
    if nonce.len() != confide_crypto::relay::NONCE_BYTES {
        return Err(Status::invalid_argument(format!(
            "relay {relay}: {RELAYED_NONCE} is {} bytes, not {}",
            nonce.len(),
            confide_crypto::relay::NONCE_BYTES
        )));
    }
    let ca = std::fs::read(hub.pki.ca_cert()).map_err(|e| Status::internal(format!("CA certificate: {e}")))?;
    let mut verifier = confide_crypto::identity::CertVerifier::with_revocations(&ca, hub.revocations.clone())
        .map_err(|e| Status::internal(e.to_string()))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let party = confide_crypto::relay::check_delegation(&mut verifier, &cert, relay, time, &nonce, &signature, now)
        .map_err(|e| Status::permission_denied(format!("relay {relay}: {e}")))?;
    // Kept in the database, not only in memory: after a restart a relay
    // could otherwise present a delegation made in the last minutes once
    // more (found by review).
    let keep = 2 * confide_crypto::relay::MAX_CLOCK_SKEW_SECS;
    match hub.db.first_use_of_nonce(&nonce, now, keep) {
        Ok(true) => {}
        Ok(false) => {
            return Err(Status::permission_denied(format!("relay {relay}: replayed a delegation of {party}")));
        }
        Err(e) => {
            warn!("cannot record a relay delegation's nonce: {e}");
            return Err(Status::unavailable("the coordinator cannot record the delegation (retry)"));
        }
    }
    match hub.pki.enrolled() {
        Ok(list) if list.contains(&party) => Ok((party, cert)),
        Ok(_) => Err(Status::permission_denied(format!("party {party} (through relay {relay}) is not enrolled"))),
        Err(e) => {
            warn!("cannot read the enrollment list: {e}");
            Err(Status::internal("the coordinator cannot read its enrollment list"))
        }
    }
}

/// How often the coordinator re-reads its enrollment and revocation lists.
const ENROLLMENT_POLL: Duration = Duration::from_secs(2);

/// How long a closed stream's close waits behind the messages queued
/// before it, before it ends the stream ahead of them.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The most HTTP/2 streams one connection may have open at once.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// How long a close sent ahead of a stream's queue waits for the stream to
/// end before its connection is cut.
pub(crate) const CUT_AFTER: Duration = Duration::from_secs(5);

/// How long a newer revocation list waits for room in a stream's queue.
/// A party checks its peers' certificates against the list it holds, so a
/// list must not be dropped on a full queue: a stream whose queue stays
/// full this long is closed instead, and its reconnect's welcome carries
/// the list.
const REVOCATIONS_DELIVERY: Duration = Duration::from_secs(10);

/// Queues `body` on each stream, waiting up to `within` for room in each
/// (all at once); returns the streams (name, number) it did not reach
/// because their queues stayed full. A stream that closed meanwhile is not
/// returned: there is nothing left to reach.
async fn queue_on_each(
    streams: Vec<(String, u64, mpsc::Sender<Outbound>)>,
    body: &coordinator_message::Body,
    within: Duration,
) -> Vec<(String, u64)> {
    let sends = streams.into_iter().map(|(party, conn_id, tx)| async move {
        match tokio::time::timeout(within, tx.send(Outbound::Msg(body.clone()))).await {
            Err(_elapsed) => Some((party, conn_id)),
            Ok(_sent_or_closed) => None,
        }
    });
    futures::future::join_all(sends).await.into_iter().flatten().collect()
}

/// Applies changes to the enrollment list and the revocation list while
/// the coordinator runs: a newer revocation list goes to every connected
/// party, and a party whose certificate it revokes, or that was removed
/// from the enrollment list, has its open stream closed at once (its jobs
/// see it leave; the handshake refuses it from then on).
async fn watch_enrollment(hub: Arc<Hub>) {
    // A bad list is reported once, not every poll.
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(ENROLLMENT_POLL).await;
        let read = {
            let pki = hub.pki.clone();
            tokio::task::spawn_blocking(move || (pki.revocations(), pki.enrolled())).await
        };
        let Ok((revocations, enrolled)) = read else { continue };
        match revocations {
            Ok(newer) if newer.version() > hub.revocation_list().version() => {
                last_error.clear();
                let (crl, version, revoked) = (newer.der().to_vec(), newer.version(), newer.len());
                // Kept first: a restart must not go back to an older list.
                if let Err(e) = hub.db.keep_revocation_list(version, &crl) {
                    warn!("the revocation list (version {version}) could not be kept in the database: {e}");
                }
                hub.revocations.write().unwrap_or_else(|p| p.into_inner()).update(newer).ok();
                // (Logged once in force: new streams and calls are checked against it.)
                info!(version, revoked, "revocation list updated; sending it to the parties");
                // Queued at once where there is room, before any close below
                // (a party whose relay it revokes must still receive it); a
                // full queue is waited for off the watcher's loop.
                let body = coordinator_message::Body::Revocations(pb::RevocationList { crl });
                let full: Vec<_> = hub
                    .streams()
                    .into_iter()
                    .filter(|(_, _, tx)| matches!(tx.try_send(Outbound::Msg(body.clone())), Err(TrySendError::Full(_))))
                    .collect();
                let hub = hub.clone();
                tokio::spawn(async move {
                    for (party, conn_id) in queue_on_each(full, &body, REVOCATIONS_DELIVERY).await {
                        let why = format!(
                            "party {party}: the revocation list (version {version}) found no room in the stream's \
                             queue within {} s; a reconnect's welcome carries it",
                            REVOCATIONS_DELIVERY.as_secs()
                        );
                        hub.expel(&party, conn_id, &why, Closing::AheadOfItsQueue);
                    }
                });
            }
            Ok(list) => {
                let in_force = hub.revocation_list();
                let e = if list.version() < in_force.version() {
                    format!(
                        "revocation list not applied: the file is version {}, older than version {} in force",
                        list.version(),
                        in_force.version()
                    )
                } else if list.der() != in_force.der() {
                    format!("revocation list not applied: the file differs from version {} in force", list.version())
                } else {
                    String::new()
                };
                if !e.is_empty() && e != last_error {
                    warn!("{e}");
                }
                last_error = e;
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    warn!("revocation list not applied: {e}");
                    last_error = e;
                }
            }
        }
        let list = hub.revocation_list();
        let now = crate::db::unix_now();
        // A certificate that expires while its connection is open: the
        // handshake checked it once (found by review).
        let expired = |cert: &[u8]| confide_crypto::pki::not_after(cert).is_ok_and(|t| t <= now);
        for (Connection { party, certificate, relay }, conn_id) in hub.numbered_connections() {
            if expired(&certificate) {
                hub.expel(
                    &party,
                    conn_id,
                    &format!("party {party}: its certificate has expired"),
                    Closing::BehindItsQueue,
                );
                continue;
            }
            if let Some((r, _)) = relay.as_ref().filter(|(_, cert)| expired(cert)) {
                let why = format!("party {party}: its relay {r}'s certificate has expired");
                hub.expel(&party, conn_id, &why, Closing::BehindItsQueue);
                continue;
            }
            let relay_revoked = relay.as_ref().filter(|(r, cert)| list.check(r, cert).is_err());
            // A revoked party's queue is not for it; a party whose relay is
            // revoked is sent the list first (and the rest of its queue).
            let (why, closing) = match (&enrolled, list.check(&party, &certificate), relay_revoked) {
                (_, Err(_), _) => (
                    format!("party {party}: its certificate is revoked (list version {})", list.version()),
                    Closing::AheadOfItsQueue,
                ),
                // A revoked relay loses every stream it carries.
                (_, _, Some((r, _))) => {
                    (format!("party {party}: its relay {r}'s certificate is revoked"), Closing::BehindItsQueue)
                }
                (Ok(names), Ok(()), None) if !names.contains(&party) => {
                    (format!("party {party} is no longer enrolled"), Closing::BehindItsQueue)
                }
                _ => continue,
            };
            hub.expel(&party, conn_id, &why, closing);
        }
    }
}

/// Refuses a certificate past its expiry (one that does not parse was
/// refused at the handshake, or by the relay's checks).
fn not_expired(name: &str, cert: &[u8]) -> Result<(), Status> {
    match confide_crypto::pki::not_after(cert) {
        Ok(t) if t <= crate::db::unix_now() => {
            warn!(name, "refused a stream: the certificate of {name} has expired");
            Err(Status::permission_denied(format!("the certificate of {name} has expired")))
        }
        _ => Ok(()),
    }
}

/// Runs a database write off the tokio workers, logging a failure.
fn spawn_db(f: impl FnOnce() -> Result<(), Error> + Send + 'static) {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = f() {
            warn!("database: {e}");
        }
    });
}

async fn writer(
    mut rx: mpsc::Receiver<Outbound>,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    chunk_bytes: usize,
    sent_bytes: prometheus::IntCounter,
) {
    let wrap = |b| {
        let m = pb::CoordinatorMessage { body: Some(b) };
        sent_bytes.inc_by(prost::Message::encoded_len(&m) as u64);
        Ok(m)
    };
    while let Some(out) = rx.recv().await {
        let ok = match out {
            Outbound::Msg(body) => tx.send(wrap(body)).await.is_ok(),
            Outbound::Task(task) => {
                let mut ok = tx.send(wrap(coordinator_message::Body::Task(task.msg.clone()))).await.is_ok();
                if let Some(bytes) = &task.bytes {
                    for chunk in transfer::chunks(task.msg.task_id, bytes, chunk_bytes) {
                        if !ok {
                            break;
                        }
                        ok = tx.send(wrap(coordinator_message::Body::Chunk(chunk))).await.is_ok();
                    }
                }
                ok
            }
            Outbound::Model { service, sequence, bytes } => {
                let part = |offset: usize, data: bytes::Bytes, total: usize, error: String| pb::ModelPart {
                    service: service.clone(),
                    sequence,
                    total_bytes: total as u64,
                    offset: offset as u64,
                    data,
                    error,
                };
                match bytes {
                    Err(e) => tx
                        .send(wrap(coordinator_message::Body::ModelPart(part(0, Default::default(), 0, e))))
                        .await
                        .is_ok(),
                    Ok(b) => {
                        let mut ok;
                        let step = chunk_bytes.max(1);
                        // An empty model still sends one (empty) part, so the party's pull ends.
                        let mut offset = 0;
                        loop {
                            let end = (offset + step).min(b.len());
                            let msg = part(offset, b.slice(offset..end), b.len(), String::new());
                            ok = tx.send(wrap(coordinator_message::Body::ModelPart(msg))).await.is_ok();
                            offset = end;
                            if !ok || offset >= b.len() {
                                break;
                            }
                        }
                        ok
                    }
                }
            }
            Outbound::Close(status) => {
                let _ = tx.send(Err(status)).await;
                false
            }
        };
        if !ok {
            break;
        }
    }
}

/// Whether pipeline `pipeline` is still running and its iteration
/// `iteration` waits for job `job` (its recorded candidate training).
fn pipeline_waits_for(hub: &Hub, pipeline: &str, iteration: u32, job: &str) -> Result<bool, Error> {
    let running = hub.db.job_state(pipeline)?.is_some_and(|s| !s.is_terminal());
    Ok(running && hub.db.iterations(pipeline)?.iter().any(|it| it.iteration == iteration && it.candidate_job == job))
}

/// How often a party stream's reader checks, between messages, that the
/// stream is still the party's current one.
pub(crate) const READER_RECHECK: Duration = Duration::from_secs(1);

struct PendingResult {
    result: pb::TaskResult,
    incoming: Incoming,
}

/// Reads one stream of `name`'s. Its messages act by the party's name
/// (routed to its jobs, answered on its current stream), so a stream that a
/// newer one of the party's replaced is read no further: it would otherwise
/// act for the newer one, and a protocol error of its own would close the
/// newer stream. What a message records (a hello, serving counts, a cloud
/// key's certificate) is recorded for this stream alone.
async fn reader(
    hub: Arc<Hub>,
    name: String,
    conn_id: u64,
    mut inbound: Streaming<pb::PartyMessage>,
    received_bytes: prometheus::IntCounter,
) {
    let mut pending: Option<PendingResult> = None;
    // How the stream's own messages end, if this reader ends it.
    let mut ending = Status::cancelled("the stream was read no further");
    // A stream a newer one replaced (or that was closed) is left at once,
    // not at its next message: a peer that stops sending on it would
    // otherwise keep its reader, and a half-received result, for as long
    // as the connection lives, and could pile up such streams.
    let mut recheck = tokio::time::interval(READER_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            next = inbound.message() => next,
            _ = recheck.tick() => {
                if hub.is_current(&name, conn_id) {
                    continue;
                }
                info!(
                    party = %name,
                    "a stream a newer one replaced, or that was closed, is read no further (and what it was \
                     sending is dropped)"
                );
                break;
            }
        };
        match next {
            Ok(Some(_)) if !hub.is_current(&name, conn_id) => {
                info!(party = %name, "a message on a stream a newer one replaced; the older stream is read no further");
                break;
            }
            Ok(Some(msg)) => {
                received_bytes.inc_by(prost::Message::encoded_len(&msg) as u64);
                if let Err(reason) = on_party_message(&hub, &name, conn_id, msg, &mut pending) {
                    if let Some(p) = pending.take() {
                        let input = Input::TaskFailed {
                            party: name.clone(),
                            task_id: p.result.task_id,
                            reason: reason.clone(),
                        };
                        let _ = hub.route_from(&name, conn_id, &p.result.job_id, input);
                    }
                    warn!(party = %name, "closing the stream: {reason}");
                    ending = Status::invalid_argument(reason);
                    break;
                }
            }
            Ok(None) => {
                info!(party = %name, "party closed its stream");
                ending = Status::cancelled("the party ended its stream");
                break;
            }
            Err(status) => {
                warn!(party = %name, "party stream failed: {}", status.message());
                ending = Status::cancelled(format!("the party's stream failed: {}", status.message()));
                break;
            }
        }
    }
    // Its own messages end too; a party that stopped reading them is cut
    // off like any other (its request side may have ended alone).
    if hub.close_stream(&name, conn_id, ending, Closing::BehindItsQueue) {
        info!(party = %name, "party disconnected");
    }
}

/// Handles one message; an `Err` is a protocol violation that closes the stream.
fn on_party_message(
    hub: &Hub,
    name: &str,
    conn_id: u64,
    msg: pb::PartyMessage,
    pending: &mut Option<PendingResult>,
) -> Result<(), String> {
    match msg.body {
        None => Err("empty message".into()),
        Some(party_message::Body::Hello(h)) => {
            let (kept, dropped) = kept_hello(h);
            // The version as kept (cut to its bound), not as sent.
            debug!(party = name, version = %kept.software_version, "hello");
            if let Some(why) = dropped {
                warn!(party = name, "hello: {why}; not kept");
            }
            hub.on_stream(name, conn_id, |c| c.hello = Some(kept));
            Ok(())
        }
        Some(party_message::Body::JobAnswer(a)) => {
            // What a party writes is logged bounded: its job id is checked,
            // its reason cut (a megabyte per message would fill the disk).
            confide_proto::validate_job_id(&a.job_id).map_err(|e| format!("job answer: {e}"))?;
            let reason: String = a.reason.chars().take(1000).collect();
            if a.accepted {
                info!(party = name, job = %a.job_id, "party accepted the job");
            } else {
                warn!(party = name, job = %a.job_id, "party refused the job: {reason}");
            }
            hub.route_from(
                name,
                conn_id,
                &a.job_id,
                Input::Answer { party: name.to_owned(), accepted: a.accepted, reason },
            )?;
            Ok(())
        }
        Some(party_message::Body::Failed(f)) => {
            confide_proto::validate_job_id(&f.job_id).map_err(|e| format!("task failure: {e}"))?;
            let reason: String = f.reason.chars().take(1000).collect();
            warn!(party = name, job = %f.job_id, "party could not do task {}: {reason}", f.task_id);
            hub.route_from(
                name,
                conn_id,
                &f.job_id,
                Input::TaskFailed { party: name.to_owned(), task_id: f.task_id, reason },
            )?;
            Ok(())
        }
        Some(party_message::Body::Result(mut r)) => {
            confide_proto::validate_job_id(&r.job_id).map_err(|e| format!("result: {e}"))?;
            if pending.is_some() {
                return Err("a new result started before the previous one's chunks ended".into());
            }
            match r.bulk.take() {
                None => deliver(hub, name, conn_id, r, None),
                Some(header) => {
                    // A result no job will take (one not running, or not
                    // naming this party: a late answer, or a peer filling
                    // memory) is checked and dropped chunk by chunk; its
                    // announced size is never allocated.
                    let open = if hub.takes_results_from(name, &r.job_id) {
                        Incoming::start
                    } else {
                        Incoming::start_discarding
                    };
                    let incoming = open(&header, &hub.limits)
                        .map_err(|e| format!("result of job {} task {}: {e}", r.job_id, r.task_id))?;
                    if incoming.is_discarding() {
                        info!(party = name, job = %r.job_id, "a result for a job that is not running or does not name the party; its chunks are dropped");
                    }
                    if incoming.is_complete() && incoming.is_discarding() {
                        // Nothing to take: the header was all.
                    } else if incoming.is_complete() {
                        let bulk = incoming.finish().map_err(|e| e.to_string())?;
                        deliver(hub, name, conn_id, r, Some(bulk))?;
                    } else {
                        *pending = Some(PendingResult { result: r, incoming });
                    }
                    Ok(())
                }
            }
        }
        Some(party_message::Body::Pull(p)) => {
            debug!(party = name, service = %p.service, sequence = p.sequence, "model pull");
            confide_proto::deploy::validate_service_name(&p.service).map_err(|e| format!("model pull: {e}"))?;
            // To this stream, not by name (a newer stream did not ask).
            let (db, party) = (hub.db.clone(), name.to_owned());
            let Some((tx, pulls)) = hub.on_stream(name, conn_id, |c| (c.tx.clone(), c.pulls.clone())) else {
                return Ok(());
            };
            {
                let mut q = lock(&pulls);
                let newer = q.waiting.get(&p.service).is_none_or(|s| *s < p.sequence);
                if newer {
                    q.waiting.insert(p.service.clone(), p.sequence);
                }
                if q.waiting.len() > MAX_SERVING_SERVICES {
                    return Err(format!("model pulls of more than {MAX_SERVING_SERVICES} services at once"));
                }
                if std::mem::replace(&mut q.running, true) {
                    return Ok(()); // the running reader takes it up
                }
            }
            tokio::task::spawn_blocking(move || {
                loop {
                    let next = {
                        let mut q = lock(&pulls);
                        match q.waiting.pop_first() {
                            Some(next) => next,
                            None => {
                                q.running = false;
                                return;
                            }
                        }
                    };
                    let (service, sequence) = next;
                    let bytes =
                        crate::services::model_for_pull(&db, &party, &service, sequence).map(bytes::Bytes::from);
                    if let Err(e) = &bytes {
                        warn!(party = %party, service = %service, "model pull refused: {e}");
                    }
                    if tx.blocking_send(Outbound::Model { service, sequence, bytes }).is_err() {
                        // The stream is gone: so are the pulls it waited on.
                        lock(&pulls).running = false;
                        return;
                    }
                }
            });
            Ok(())
        }
        Some(party_message::Body::CloudKey(k)) => {
            confide_proto::deploy::validate_service_name(&k.service).map_err(|e| format!("cloud key: {e}"))?;
            if k.public_key.len() != 32 || k.signature.len() > 256 {
                return Err("cloud key: a public key of 32 bytes and a signature".into());
            }
            let certificate = hub
                .on_stream(name, conn_id, |c| c.certificate.to_vec())
                .ok_or("cloud key from a stream no longer the party's")?;
            let announcement = pb::CloudKeyAnnouncement { party: name.to_owned(), key: Some(k.clone()), certificate };
            {
                let mut keys = lock(&hub.cloud_keys);
                let key = (name.to_owned(), k.service.clone());
                // The same key again (its signature differs: ECDSA draws a
                // nonce): every party has it.
                let same = |held: &pb::CloudKeyAnnouncement| {
                    held.key.as_ref().is_some_and(|h| h.public_key == k.public_key && h.issued_at == k.issued_at)
                };
                if keys.get(&key).is_some_and(same) {
                    return Ok(());
                }
                if !keys.contains_key(&key)
                    && keys.keys().filter(|(p, _)| p == name).count() >= MAX_CLOUD_KEYS_PER_PARTY
                {
                    warn!(party = name, service = %k.service, "cloud key not taken: {MAX_CLOUD_KEYS_PER_PARTY} held");
                    return Ok(());
                }
                keys.insert(key, announcement.clone());
            }
            info!(party = name, service = %k.service, "cloud key announced");
            hub.send_all(&coordinator_message::Body::CloudKey(announcement));
            Ok(())
        }
        Some(party_message::Body::Forward(f)) => {
            // Only to the cloud tier the service's current deployment names.
            let refuse = |why: String| {
                let answer = pb::ForwardAnswer {
                    request_id: f.request_id,
                    peer: f.peer.clone(),
                    ciphertext: Vec::new(),
                    error: why,
                };
                // To this stream (a newer one did not ask).
                hub.on_stream(name, conn_id, |c| {
                    let _ = c.tx.try_send(Outbound::Msg(coordinator_message::Body::ForwardAnswer(answer)));
                });
            };
            if let Err(e) = confide_proto::deploy::validate_service_name(&f.service)
                .and_then(|()| confide_proto::deploy::validate_service_name(&f.cloud_service))
            {
                refuse(format!("forward: {e}"));
                return Ok(());
            }
            match hub.joint_route(&f.service) {
                Ok(Some(j)) if j.cloud == f.peer && j.cloud_service == f.cloud_service => {
                    let cloud = f.peer.clone();
                    // A second past the edge's own wait: the answer is no use after it.
                    let wait = Duration::from_millis(j.timeout_ms).saturating_add(Duration::from_secs(1));
                    if !hub.forwarding(&cloud, name, f.request_id, wait) {
                        refuse(format!("{MAX_FORWARDS_PER_EDGE} requests already wait for their answers"));
                        return Ok(());
                    }
                    let delivered = pb::Forward { peer: name.to_owned(), ..f.clone() };
                    if hub.send(&cloud, Outbound::Msg(coordinator_message::Body::Forwarded(delivered))) {
                        hub.metrics.forwarded(&f.service);
                    } else {
                        hub.answered(&cloud, name, f.request_id);
                        refuse(format!("cloud party {cloud} is not connected"));
                    }
                }
                Ok(_) => refuse(format!(
                    "service {}'s deployment does not send hard examples to {}'s service {}",
                    f.service, f.peer, f.cloud_service
                )),
                Err(e) => refuse(format!("service {}: {e}", f.service)),
            }
            Ok(())
        }
        Some(party_message::Body::Serving(r)) => {
            check_serving_report(&r)?;
            // Under the parties' lock, as a close removes them: counts never
            // outlive the stream that reported them.
            hub.on_stream(name, conn_id, |_| lock(&hub.serving).insert(name.to_owned(), r.services));
            Ok(())
        }
        Some(party_message::Body::ForwardAnswer(a)) => {
            let edge = a.peer.clone();
            // Only an answer to a request relayed to this party, once.
            if !hub.answered(name, &edge, a.request_id) {
                debug!(party = name, edge = %edge, "an answer to no request relayed to it");
                return Ok(());
            }
            let delivered = pb::ForwardAnswer { peer: name.to_owned(), ..a };
            if !hub.send(&edge, Outbound::Msg(coordinator_message::Body::ForwardAnswer(delivered))) {
                debug!(party = name, edge = %edge, "an answer for a party that left");
            }
            Ok(())
        }
        Some(party_message::Body::Chunk(c)) => {
            let p = pending.as_mut().ok_or("chunk without an announced transfer")?;
            p.incoming
                .push(&c)
                .map_err(|e| format!("result of job {} task {}: {e}", p.result.job_id, p.result.task_id))?;
            if p.incoming.is_complete()
                && let Some(p) = pending.take()
                && !p.incoming.is_discarding()
            {
                let bulk = p
                    .incoming
                    .finish()
                    .map_err(|e| format!("result of job {} task {}: {e}", p.result.job_id, p.result.task_id))?;
                deliver(hub, name, conn_id, p.result, Some(bulk))?;
            }
            Ok(())
        }
    }
}

/// Turns a complete result into a session input; a result that does not
/// convert fails the task (the party is dropped from the round, named).
/// An error closes the party's stream (see [`Hub::route_from`]).
fn deliver(hub: &Hub, name: &str, conn_id: u64, r: pb::TaskResult, bulk: Option<transfer::Bulk>) -> Result<(), String> {
    let (job_id, task_id) = (r.job_id.clone(), r.task_id);
    let input = match TaskResult::try_from((r, bulk)) {
        Ok(result) => {
            debug!(party = name, job = %job_id, round = result.round, stage = result.body.stage_name(), "result received");
            Input::Result { party: name.to_owned(), task_id, result: result.body }
        }
        Err(e) => {
            warn!(party = name, job = %job_id, "malformed result: {e}");
            Input::TaskFailed { party: name.to_owned(), task_id, reason: format!("malformed result: {e}") }
        }
    };
    hub.route_from(name, conn_id, &job_id, input).map(drop)
}

struct AdminSvc {
    hub: Arc<Hub>,
}

fn require_admin<T>(hub: &Hub, req: &Request<T>) -> Result<(), Status> {
    let id = peer_of(req)?;
    if id.role != Role::Admin {
        return Err(Status::permission_denied(format!("{} may not use the admin API", id.name)));
    }
    admin_still_admitted(hub, &id, &peer_certificate(req)?)
}

/// An administrator's certificate neither revoked nor expired now: checked
/// on every request and before each update of a job watch, since the
/// handshake checked it once and a connection outlives both.
fn admin_still_admitted(hub: &Hub, id: &confide_crypto::pki::PeerIdentity, certificate: &[u8]) -> Result<(), Status> {
    hub.not_revoked(id, certificate)?;
    still_valid(&id.name, certificate, crate::db::unix_now())
}

/// A certificate within its validity at `now`.
fn still_valid(name: &str, certificate: &[u8], now: u64) -> Result<(), Status> {
    let until = confide_crypto::pki::not_after(certificate).map_err(|e| Status::permission_denied(e.to_string()))?;
    // Valid through its notAfter second (RFC 5280), as at the handshake.
    if now > until {
        warn!(name, "refused a request: the certificate of {name} expired at {until} (Unix seconds)");
        return Err(Status::permission_denied(format!(
            "the certificate of {name} expired at {until} (Unix seconds); renew it"
        )));
    }
    Ok(())
}

/// Runs a blocking database call off the tokio workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, Error> + Send + 'static) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("database task: {e}"))),
    }
}

async fn job_status(hub: &Arc<Hub>, id: &str, history: bool) -> Result<pb::JobStatus, Status> {
    let (hub, id) = (hub.clone(), id.to_owned());
    blocking(move || hub.db.job_status(&id, history)).await.map(pb::JobStatus::from)
}

pub(crate) fn new_job_id() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("j{ms:x}-{:04x}", rand::random::<u16>())
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobReply>, Status> {
        require_admin(&self.hub, &req)?;
        let r = req.into_inner();
        let hub = self.hub.clone();
        let (id, warnings) = blocking(move || submit(&hub, r)).await?;
        Ok(Response::new(pb::SubmitJobReply { job_id: id, warnings }))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsReply>, Status> {
        require_admin(&self.hub, &req)?;
        let hub = self.hub.clone();
        let jobs = blocking(move || hub.db.list_jobs()).await?;
        // Every job ever, newest first: pipelines add jobs for as long as
        // they run, so the reply keeps what fits a message (past it the
        // list used to fail for good; found by review).
        let mut jobs: Vec<pb::JobStatus> = jobs.into_iter().map(pb::JobStatus::from).collect();
        let truncated = keep_within(&mut jobs, MAX_LIST_REPLY_BYTES);
        Ok(Response::new(pb::ListJobsReply { jobs, truncated }))
    }

    async fn get_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobStatus>, Status> {
        require_admin(&self.hub, &req)?;
        let id = req.into_inner().job_id;
        admin_job_id(&id)?;
        Ok(Response::new(job_status(&self.hub, &id, true).await?))
    }

    type WatchJobStream = BoxStream<pb::JobStatus>;

    async fn watch_job(&self, req: Request<pb::JobRef>) -> Result<Response<Self::WatchJobStream>, Status> {
        require_admin(&self.hub, &req)?;
        // A watch lasts as long as its job: the admin's certificate is
        // checked again before each update and at each poll of the lists,
        // so a revoked or expired administrator's watch of a quiet job ends
        // within a poll, not at the job's next change.
        let (admin, certificate) = (peer_of(&req)?, peer_certificate(&req)?);
        let id = req.into_inner().job_id;
        admin_job_id(&id)?;
        let hub = self.hub.clone();
        // Subscribe before reading, so that no change between the two is missed.
        let mut changes = lock(&hub.jobs).get(&id).map(|j| j.status.subscribe());
        let first = job_status(&hub, &id, true).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + ENROLLMENT_POLL, ENROLLMENT_POLL);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Woken by this job's changes (the channel closes when it
                // ends), by the poll's tick (the certificate alone is checked
                // again), or by the watcher going away: a watch of a job that
                // stays unchanged for long (a paused pipeline) does not
                // outlive its client.
                let running = match changes.as_mut() {
                    Some(c) => tokio::select! {
                        changed = c.changed() => Some(changed.is_ok()),
                        _ = recheck.tick() => None,
                        () = tx.closed() => return,
                    },
                    None => Some(false),
                };
                if let Err(refused) = admin_still_admitted(&hub, &admin, &certificate) {
                    let _ = tx.send(Err(refused)).await;
                    return;
                }
                let Some(running) = running else { continue };
                match job_status(&hub, &id, true).await {
                    Ok(s) if s != last => {
                        last = s.clone();
                        if tx.send(Ok(s)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                if !running {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobStatus>, Status> {
        require_admin(&self.hub, &req)?;
        let id = req.into_inner().job_id;
        admin_job_id(&id)?;
        let st = job_status(&self.hub, &id, false).await?;
        let state = JobState::try_from(st.state).unwrap_or(JobState::Failed);
        if state.is_terminal() {
            return Err(Status::failed_precondition(format!("job {id} has already ended ({})", state.as_str())));
        }
        let mut changes = lock(&self.hub.jobs).get(&id).map(|j| j.status.subscribe());
        self.hub.route(&id, Input::Cancel);
        // Wait briefly for the job's thread to record the cancellation.
        if let Some(c) = changes.as_mut() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::timeout_at(deadline, c.changed()).await.is_ok_and(|r| r.is_ok()) {}
        }
        Ok(Response::new(job_status(&self.hub, &id, true).await?))
    }

    type GetModelStream = BoxStream<pb::ModelChunk>;

    async fn get_model(&self, req: Request<pb::JobRef>) -> Result<Response<Self::GetModelStream>, Status> {
        require_admin(&self.hub, &req)?;
        let r = req.into_inner();
        let (id, wanted) = (r.job_id, r.round);
        admin_job_id(&id)?;
        let hub = self.hub.clone();
        let (round, bytes) = blocking(move || {
            let (round, path) = match wanted {
                None => hub.db.model_of(&id)?.ok_or_else(|| Error::NotFound(format!("job {id} has no model yet")))?,
                Some(round) => {
                    let v = hub.db.model_version(&id, round)?.ok_or_else(|| {
                        let kept: Vec<String> = hub
                            .db
                            .model_versions(Some(&id))
                            .unwrap_or_default()
                            .iter()
                            .map(|v| v.round.to_string())
                            .collect();
                        Error::NotFound(format!(
                            "job {id} has no kept model of round {round} (kept: {})",
                            if kept.is_empty() { "none".to_owned() } else { kept.join(", ") }
                        ))
                    })?;
                    (v.round, v.path)
                }
            };
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            Ok((round, bytes))
        })
        .await
        .map_err(|s| if s.code() == tonic::Code::NotFound { Status::failed_precondition(s.message()) } else { s })?;
        // Each chunk is cut from the file's bytes as the stream is read: one
        // copy of the model is held, not a second one in chunks.
        let chunk = self.hub.limits.chunk_bytes.max(1);
        let total = bytes.len() as u64;
        let msgs = (0..bytes.len().div_ceil(chunk)).map(move |i| {
            let data = bytes[i * chunk..((i + 1) * chunk).min(bytes.len())].to_vec();
            Ok(pb::ModelChunk { total_bytes: total, round, data })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn list_models(&self, req: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsReply>, Status> {
        require_admin(&self.hub, &req)?;
        let job = req.into_inner().job_id;
        if !job.is_empty() {
            admin_job_id(&job)?;
        }
        let hub = self.hub.clone();
        let versions = blocking(move || {
            let versions = hub.db.model_versions((!job.is_empty()).then_some(job.as_str()))?;
            let mut out = Vec::with_capacity(versions.len());
            let mut architectures: HashMap<String, String> = HashMap::new();
            for v in versions {
                if !architectures.contains_key(&v.job_id) {
                    let model = crate::services::architecture_of(&hub.db, &v.job_id, &hub.limits)?;
                    let text = toml::to_string(&model).map_err(|e| Error::Storage(format!("job {}: {e}", v.job_id)))?;
                    architectures.insert(v.job_id.clone(), text);
                }
                let architecture = architectures.get(&v.job_id).cloned().unwrap_or_default();
                let services = hub.db.services_of(&v.job_id, v.round)?;
                out.push((v, architecture, services));
            }
            Ok(out)
        })
        .await?;
        let mut models: Vec<pb::ModelVersion> = versions
            .into_iter()
            .map(|(v, architecture, services)| pb::ModelVersion {
                job_id: v.job_id,
                round: v.round,
                sha256: v.sha256,
                bytes: v.bytes,
                metrics: v.metrics.into_iter().collect(),
                created_at: v.created_at,
                architecture,
                services,
            })
            .collect();
        let truncated = keep_within(&mut models, MAX_LIST_REPLY_BYTES);
        Ok(Response::new(pb::ListModelsReply { models, truncated }))
    }

    async fn deploy(&self, req: Request<pb::ServiceDeployment>) -> Result<Response<pb::ServiceStatus>, Status> {
        require_admin(&self.hub, &req)?;
        let caller = peer_certificate(&req)?;
        let msg = req.into_inner();
        let hub = self.hub.clone();
        let pushed = msg.clone();
        let status = blocking(move || crate::services::deploy(&hub, &msg, &caller)).await?;
        self.hub.deployed(pushed);
        Ok(Response::new(status))
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesReply>, Status> {
        require_admin(&self.hub, &req)?;
        let service = req.into_inner().service;
        if !service.is_empty() {
            confide_proto::deploy::validate_service_name(&service)
                .map_err(|e| Status::invalid_argument(format!("service: {e}")))?;
        }
        let hub = self.hub.clone();
        let hub2 = hub.clone();
        let mut services =
            blocking(move || crate::services::statuses(&hub2.db, (!service.is_empty()).then_some(service.as_str())))
                .await?;
        let reports = lock(&hub.serving);
        for s in &mut services {
            let mut total = pb::ServiceRows { service: s.service.clone(), ..Default::default() };
            let mut parties: Vec<String> = Vec::new();
            for (party, rows) in reports.iter() {
                for r in rows.iter().filter(|r| r.service == s.service) {
                    total.requests = total.requests.saturating_add(r.requests);
                    total.edge_rows = total.edge_rows.saturating_add(r.edge_rows);
                    total.cloud_rows = total.cloud_rows.saturating_add(r.cloud_rows);
                    total.edge_hard_rows = total.edge_hard_rows.saturating_add(r.edge_hard_rows);
                    parties.push(party.clone());
                }
            }
            parties.sort();
            s.serving = Some(total);
            s.serving_parties = parties;
        }
        drop(reports);
        let truncated = keep_within(&mut services, MAX_LIST_REPLY_BYTES);
        Ok(Response::new(pb::ListServicesReply { services, truncated }))
    }

    async fn list_parties(
        &self,
        req: Request<pb::ListPartiesRequest>,
    ) -> Result<Response<pb::ListPartiesReply>, Status> {
        require_admin(&self.hub, &req)?;
        let hub = self.hub.clone();
        let mut parties = blocking(move || party_infos(&hub)).await?;
        let truncated = keep_within(&mut parties, MAX_LIST_REPLY_BYTES);
        Ok(Response::new(pb::ListPartiesReply { parties, truncated }))
    }
}

/// What the coordinator keeps of a hello: the software version (64
/// characters at most) and the advertised policy, which is advisory, shown
/// to administrators: one too large or not JSON is dropped (and why is
/// returned), never a reason to close the stream.
fn kept_hello(h: pb::Hello) -> (pb::Hello, Option<String>) {
    let mut policy_json = h.policy_json;
    let dropped = if policy_json.len() > MAX_ADVERTISED_POLICY {
        Some(format!("its advertised policy exceeds {MAX_ADVERTISED_POLICY} bytes"))
    } else if !policy_json.is_empty() && serde_json::from_str::<serde_json::Value>(&policy_json).is_err() {
        Some("its advertised policy is not JSON".to_owned())
    } else {
        None
    };
    if dropped.is_some() {
        policy_json.clear();
    }
    let software_version: String = h.software_version.chars().take(64).collect();
    (pb::Hello { software_version, policy_json, ..Default::default() }, dropped)
}

/// Joint-inference routes (each service's cloud tier) read from the
/// database, and how many deployments have cleared them.
#[derive(Default)]
struct JointRoutes {
    generation: u64,
    routes: HashMap<String, Option<confide_proto::deploy::JointConfig>>,
}

/// Routes kept in [`JointRoutes`] at most.
const MAX_CACHED_ROUTES: usize = 4096;

/// Most bytes of services a `ListServices` reply lists (a client decodes
/// at most the default 4 MiB).
const MAX_LIST_REPLY_BYTES: usize = 3 << 20;

/// Keeps the first of `items` that fit in `bytes` encoded, so that a
/// reply fits a message however many there are; true when some were left
/// out.
fn keep_within<T: prost::Message>(items: &mut Vec<T>, bytes: usize) -> bool {
    let mut room = bytes;
    let fit = items
        .iter()
        .take_while(|s| room.checked_sub(prost::Message::encoded_len(*s) + 8).map(|r| room = r).is_some())
        .count();
    let truncated = fit < items.len();
    items.truncate(fit);
    truncated
}

/// A serving report within bounds: at most [`MAX_SERVING_SERVICES`]
/// services, each a valid service name, none twice.
fn check_serving_report(r: &pb::ServingReport) -> Result<(), String> {
    if r.services.len() > MAX_SERVING_SERVICES {
        return Err(format!("serving report: {} services (at most {MAX_SERVING_SERVICES})", r.services.len()));
    }
    let mut seen = std::collections::HashSet::new();
    for s in &r.services {
        confide_proto::deploy::validate_service_name(&s.service).map_err(|e| format!("serving report: {e}"))?;
        if !seen.insert(s.service.as_str()) {
            return Err(format!("serving report: service {} listed twice", s.service));
        }
    }
    Ok(())
}

/// Enrolled parties and any other that ever connected, with what the
/// coordinator knows of their current stream.
fn party_infos(hub: &Hub) -> Result<Vec<pb::PartyInfo>, Error> {
    let enrolled = hub.pki.enrolled()?;
    let mut infos: std::collections::BTreeMap<String, pb::PartyInfo> = enrolled
        .iter()
        .map(|n| (n.clone(), pb::PartyInfo { name: n.clone(), enrolled: true, ..Default::default() }))
        .collect();
    for (name, first_seen, last_seen) in hub.db.parties_seen()? {
        let info = infos.entry(name.clone()).or_insert_with(|| pb::PartyInfo { name, ..Default::default() });
        info.first_seen = first_seen;
        info.last_seen = last_seen;
    }
    for (name, c) in lock(&hub.parties).iter() {
        let info =
            infos.entry(name.clone()).or_insert_with(|| pb::PartyInfo { name: name.clone(), ..Default::default() });
        info.connected = true;
        info.certificate_not_after = confide_crypto::pki::not_after(&c.certificate).unwrap_or(0);
        info.relay = c.relay.as_ref().map(|(r, _)| r.clone()).unwrap_or_default();
        if let Some(h) = &c.hello {
            info.software_version = h.software_version.clone();
            info.policy_json = h.policy_json.clone();
        }
    }
    Ok(infos.into_values().collect())
}

/// Characters of a submitted spec's file name kept (it is only echoed).
const MAX_FILE_NAME_CHARS: usize = 255;

/// Validates a submitted spec as a whole (fields, enrolment, this build's
/// kinds, strategies, protocols and capabilities), stores it and starts it.
fn submit(hub: &Arc<Hub>, r: pb::SubmitJobRequest) -> Result<(String, Vec<String>), Error> {
    // The name is only echoed (in every error and log line): printable and
    // at most 255 characters of it.
    let shown: String = r.file_name.chars().filter(|c| !c.is_control()).take(MAX_FILE_NAME_CHARS).collect();
    let file = if shown.is_empty() { "(submitted spec)".to_owned() } else { shown };
    let spec = JobSpec::parse_with(&r.spec_toml, &file, &hub.limits, hub.plugins.protocols())?;
    let enrolled = hub.pki.enrolled()?;
    let unknown: Vec<String> = spec
        .parties
        .names
        .iter()
        .enumerate()
        .filter(|(_, n)| !enrolled.contains(n))
        .map(|(i, n)| format!("\n  {file}: parties.names[{i}]: {n:?} is not enrolled in this federation"))
        .collect();
    if !unknown.is_empty() {
        return Err(Error::Refused(format!("{file}: invalid job spec{}", unknown.concat())));
    }
    if let Err(e) = hub.plugins.check(&spec) {
        return Err(Error::Refused(format!("{file}: invalid job spec\n  {file}: {e}")));
    }
    let model = initial_model(hub, &spec, None).map_err(|e| match e {
        Error::NotFound(m) => Error::Refused(format!("{file}: from_job: {m}")),
        e => e,
    })?;
    let grant = match (&spec.incremental, &r.grant) {
        (Some(_), Some(g)) => Some(crate::pipeline::check_grant(hub, &spec, &r.spec_toml, g)?),
        (Some(_), None) => {
            return Err(Error::Refused(format!(
                "{file}: an incremental pipeline needs the administrator's grant to deploy (confide job submit signs one)"
            )));
        }
        (None, Some(_)) => return Err(Error::Refused(format!("{file}: only an incremental pipeline carries a grant"))),
        (None, None) => None,
    };
    let id = new_job_id();
    let (from_round, model) = model.unzip();
    hub.db.insert_job(&id, &spec, from_round)?;
    log_start(&id, &spec, from_round);
    if let Some(g) = grant {
        hub.db.insert_pipeline(&id, &g)?;
    }
    info!(job = %id, name = %spec.name, "job submitted");
    for w in &spec.warnings {
        warn!(job = %id, "{file}: {w}");
    }
    let warnings = spec.warnings.iter().map(|w| format!("{file}: {w}")).collect();
    spawn_job(hub, id.clone(), spec, Start::Fresh { model })?;
    Ok((id, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(service: &str) -> pb::ServiceRows {
        pb::ServiceRows { service: service.into(), requests: 1, edge_rows: 1, ..Default::default() }
    }

    #[test]
    fn an_advertised_policy_too_large_or_not_json_is_dropped_not_fatal() {
        let hello =
            |policy: String| pb::Hello { software_version: "v".repeat(100), policy_json: policy, ..Default::default() };
        let (kept, why) = kept_hello(hello(r#"{"min_parties":3}"#.into()));
        assert_eq!((kept.policy_json.as_str(), why, kept.software_version.len()), (r#"{"min_parties":3}"#, None, 64));
        let (kept, why) = kept_hello(hello("<b>not json".into()));
        assert!(kept.policy_json.is_empty() && why.unwrap().contains("not JSON"));
        let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(MAX_ADVERTISED_POLICY));
        let (kept, why) = kept_hello(hello(big));
        assert!(kept.policy_json.is_empty() && why.unwrap().contains("exceeds"));
    }

    /// A revocation list is not dropped on a full queue: it waits for room,
    /// and only a stream whose queue stays full is named (to be closed).
    #[tokio::test]
    async fn a_revocation_list_waits_for_room_and_names_the_streams_it_cannot_reach() {
        let full = |n: usize| {
            let (tx, rx) = mpsc::channel::<Outbound>(n);
            for _ in 0..n {
                tx.try_send(Outbound::Msg(coordinator_message::Body::Closed(pb::JobClosed::default()))).unwrap();
            }
            (tx, rx)
        };
        let (with_room, mut with_room_rx) = mpsc::channel::<Outbound>(4);
        let (drained, mut drained_rx) = full(2);
        let (stuck, _stuck_rx) = full(2);
        let (closed, closed_rx) = full(1);
        drop(closed_rx);
        let streams = vec![
            ("with-room".to_string(), 1, with_room),
            ("drained".to_string(), 2, drained),
            ("stuck".to_string(), 3, stuck),
            ("closed".to_string(), 4, closed),
        ];
        let body = coordinator_message::Body::Revocations(pb::RevocationList { crl: vec![7; 3] });
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = Vec::new();
            while let Some(m) = drained_rx.recv().await {
                got.push(m);
                if got.len() == 3 {
                    break;
                }
            }
            got
        });
        // (Generous against a loaded machine: the drained queue has room
        // after 100 ms, the stuck one never.)
        let missed = queue_on_each(streams, &body, Duration::from_secs(3)).await;
        assert_eq!(missed, vec![("stuck".to_string(), 3)]);
        let is_list =
            |m: &Outbound| matches!(m, Outbound::Msg(coordinator_message::Body::Revocations(l)) if l.crl == [7; 3]);
        assert!(is_list(&with_room_rx.recv().await.unwrap()));
        let got = reader.await.unwrap();
        assert!(got.len() == 3 && is_list(&got[2]), "the list follows what was queued before it");
    }

    /// A close ends a stream at once, ahead of what its full queue holds
    /// (a party that does not read is still closed); a stream whose close
    /// sender went (replaced, or left the hub) delivers its queue and ends.
    #[tokio::test]
    async fn a_close_ends_the_stream_ahead_of_its_full_queue() {
        use futures::StreamExt;
        let message =
            || Ok(pb::CoordinatorMessage { body: Some(coordinator_message::Body::Closed(Default::default())) });
        let (tx, rx) = mpsc::channel(2);
        tx.try_send(message()).unwrap();
        tx.try_send(message()).unwrap();
        let (close, closed) = oneshot::channel();
        let (dropped, mut ended) = oneshot::channel();
        let mut stream = Closable::new(closed, rx, dropped);
        close.send(Status::permission_denied("revoked")).unwrap();
        let first = stream.next().await.expect("the close");
        assert!(first.is_err_and(|s| s.message() == "revoked"));
        assert!(stream.next().await.is_none(), "nothing follows the close");
        assert!(tx.send(message()).await.is_err(), "the writer's sends fail once closed");
        assert!(ended.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Empty));
        drop(stream);
        assert!(ended.await.is_err(), "dropping the stream tells that it ended");

        let (tx, rx) = mpsc::channel(2);
        tx.try_send(message()).unwrap();
        let (close, closed) = oneshot::channel::<Status>();
        let mut stream = Closable::new(closed, rx, oneshot::channel().0);
        drop(close);
        assert!(stream.next().await.expect("the queued message").is_ok());
        drop(tx);
        assert!(stream.next().await.is_none());
    }

    /// A party stream and what a test sees of it: its queue, its close, and
    /// the sender whose drop says the stream ended.
    fn party_conn(
        conn_id: u64,
        cut: &Cut,
    ) -> (PartyConn, mpsc::Receiver<Outbound>, oneshot::Receiver<Status>, oneshot::Sender<()>) {
        let (tx, queue) = mpsc::channel(1);
        let (close, closed) = oneshot::channel();
        let (dropped, ended) = oneshot::channel();
        let conn = PartyConn {
            conn_id,
            tx,
            close,
            ended,
            cut: cut.clone(),
            certificate: Arc::from(&b"cert"[..]),
            relay: None,
            hello: None,
            pulls: Arc::default(),
        };
        (conn, queue, closed, dropped)
    }

    /// A stream that will not end has its close queued, then sent ahead of
    /// the queue, then its connection cut; but not while the connection
    /// carries a current stream (a reconnect on it), only once that stream
    /// has left too. A stream that ends in time is not cut.
    #[tokio::test]
    async fn a_stream_that_will_not_end_is_cut_off_once_its_connection_carries_no_current_one() {
        let timing = ShutTiming { grace: Duration::from_millis(100), cut_after: Duration::from_millis(100) };
        let parties = Parties::default();
        let cut = Cut::default();
        let (stuck, mut queue, mut closed, _not_ended) = party_conn(1, &cut);
        let (current, ..) = party_conn(2, &cut);
        lock(&parties).insert("hospital-a".into(), current);
        shut(stuck, "hospital-a".into(), Status::aborted("replaced"), Closing::BehindItsQueue, parties.clone(), timing);
        assert!(matches!(queue.recv().await, Some(Outbound::Close(s)) if s.message() == "replaced"));
        let ahead = tokio::time::timeout(Duration::from_secs(5), &mut closed).await.expect("sent ahead");
        assert_eq!(ahead.unwrap().message(), "replaced");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!cut.is_cut(), "the connection carries the party's current stream");
        lock(&parties).clear();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cut.is_cut() {
            assert!(tokio::time::Instant::now() < deadline, "cut once no current stream uses it");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Ends within the grace: neither sent ahead nor cut.
        let cut = Cut::default();
        let (ends, _queue, mut closed, ended) = party_conn(3, &cut);
        shut(ends, "hospital-b".into(), Status::aborted("bye"), Closing::BehindItsQueue, Parties::default(), timing);
        drop(ended);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(closed.try_recv().is_err() && !cut.is_cut());
    }

    /// A hub with nothing connected and no job, over a fresh database.
    fn bare_hub(dir: &Path) -> Hub {
        Hub::new(
            Db::open(&dir.join("confide.db")).unwrap(),
            PkiDir::new(dir.join("pki")),
            Arc::new(RwLock::new(Revocations::empty())),
            (Limits::default(), dir.join("models"), ModelRetention::default()),
            Plugins::default(),
        )
        .unwrap()
    }

    /// A message read from a stream that a newer one then replaced reaches
    /// the jobs before the newer stream's join is told, or not at all: the
    /// check that the stream is current and the routing hold the parties'
    /// lock, as a join does.
    #[test]
    fn a_replaced_streams_message_is_routed_before_the_newer_join_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let hub = bare_hub(dir.path());
        let (inputs, job) = std::sync::mpsc::channel();
        let named = Arc::new(["hospital-a".to_string()].into());
        lock(&hub.jobs).insert("job-1".into(), JobHandle::new(inputs, named));
        let job = JobEnd(job);
        let answer = || Input::Answer { party: "hospital-a".into(), accepted: true, reason: String::new() };
        let cut = Cut::default();
        lock(&hub.parties).insert("hospital-a".into(), party_conn(1, &cut).0);
        assert!(hub.route_from("hospital-a", 1, "job-1", answer()).unwrap());
        assert!(matches!(job.try_recv(), Ok(Input::Answer { .. })));
        // Replaced, as a join does it: under the parties' lock.
        {
            let mut parties = lock(&hub.parties);
            parties.insert("hospital-a".into(), party_conn(2, &cut).0);
            hub.broadcast(&Input::Disconnected("hospital-a".into()));
        }
        assert!(matches!(job.try_recv(), Ok(Input::Disconnected(_))));
        assert!(!hub.route_from("hospital-a", 1, "job-1", answer()).unwrap(), "the older stream's message");
        assert!(job.try_recv().is_err(), "nothing reaches the job from the replaced stream");
        assert!(hub.route_from("hospital-a", 2, "job-1", answer()).unwrap());
        assert!(matches!(job.try_recv(), Ok(Input::Answer { .. })));
        // Nor does a party the job does not name.
        lock(&hub.parties).insert("hospital-z".into(), party_conn(9, &cut).0);
        let other = Input::Answer { party: "hospital-z".into(), accepted: true, reason: String::new() };
        hub.route_from("hospital-z", 9, "job-1", other).unwrap();
        assert!(job.try_recv().is_err(), "a party outside the job reached it");
        // A stream that left the hub routes nothing either.
        lock(&hub.parties).clear();
        assert!(!hub.route_from("hospital-a", 2, "job-1", answer()).unwrap());
        assert!(job.try_recv().is_err());
    }

    /// An administrator's certificate that expires while its connection
    /// stays open is refused from then on: each admin request checks it.
    #[test]
    fn an_expired_admin_certificate_is_refused_on_an_open_connection() {
        let ca = confide_crypto::pki::FederationCa::generate("f").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let hour = time::Duration::hours(1);
        let cert = ca.issue_with_validity(Role::Admin, "alice", &[], now - hour, now + hour).unwrap().cert_pem;
        let until = confide_crypto::pki::not_after(cert.as_bytes()).unwrap();
        assert!(still_valid("alice", cert.as_bytes(), until).is_ok());
        let e = still_valid("alice", cert.as_bytes(), until + 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("alice expired"), "{}", e.message());
    }

    /// A party may open 30 streams at once, then one every 2 s: a storm
    /// of reconnects is refused, saying when to retry; time earns joins
    /// back, up to the burst.
    #[test]
    fn a_party_that_reconnects_without_pause_is_refused_for_a_while() {
        let t0 = std::time::Instant::now();
        let mut budget = JoinBudget::full(t0, JoinBudget::BURST, JoinBudget::EVERY);
        for _ in 0..30 {
            budget.take(t0).unwrap();
        }
        let wait = budget.take(t0).unwrap_err();
        assert_eq!(wait, JoinBudget::EVERY);
        assert!(budget.take(t0 + Duration::from_millis(1999)).is_err());
        budget.take(t0 + Duration::from_millis(2000)).unwrap();
        assert!(budget.take(t0 + Duration::from_millis(2000)).is_err());
        // A long pause earns the burst back, not more.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..30 {
            budget.take(later).unwrap();
        }
        assert!(budget.take(later).is_err());
        // Through the hub: another party is not held to this one's budget.
        let dir = tempfile::tempdir().unwrap();
        let hub = bare_hub(dir.path());
        for _ in 0..30 {
            hub.take_join("hospital-a").unwrap();
        }
        let e = hub.take_join("hospital-a").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("retry in"), "{}", e.message());
        // The party reads the wait from the metadata (at most 2 s here).
        let wait = confide_proto::net::retry_after(&e).expect("the refusal says when to retry");
        assert!(wait > Duration::ZERO && wait <= JoinBudget::EVERY, "{wait:?}");
        hub.take_join("hospital-b").unwrap();
        // A relay's streams draw on its own budget first (before the
        // delegation's checks), apart from any party's: 1,024 at once.
        // A member that loops spends its own budget at the relay, not its
        // relay-mates' (found by review).
        for _ in 0..30 {
            hub.take_relayed_join("edge-a", Some("looping")).unwrap();
        }
        let e = hub.take_relayed_join("edge-a", Some("looping")).unwrap_err();
        assert!(e.message().contains("looping (through relay edge-a)"), "{}", e.message());
        hub.take_relayed_join("edge-a", Some("honest")).unwrap();
        for _ in 0..(1024 - 31) {
            hub.take_relayed_join("edge-a", None).unwrap();
        }
        let e = hub.take_relayed_join("edge-a", None).unwrap_err();
        assert!(e.message().contains("relay edge-a") && e.message().contains("retry in"), "{}", e.message());
        hub.take_join("edge-a").unwrap();
        hub.take_relayed_join("edge-b", Some("honest")).unwrap();
    }

    /// A restored or missing revocation list file does not bring revoked
    /// certificates back: the coordinator keeps the newest list it put in
    /// force in its database and keeps applying that one (found by review).
    #[test]
    fn an_older_or_missing_revocation_list_file_does_not_undo_a_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into(), "b".into()], &[]).unwrap();
        let db = Db::open(&dir.path().join("c.db")).unwrap();
        // A federation that never revoked anything starts, and starts again.
        assert_eq!(revocations_in_force(&pki, &db).unwrap().version(), 0);
        assert_eq!(revocations_in_force(&pki, &db).unwrap().version(), 0);
        pki.revoke_party("a", None).unwrap();
        let v1 = std::fs::read(pki.revocation_file()).unwrap();
        assert_eq!(revocations_in_force(&pki, &db).unwrap().version(), 1);
        pki.revoke_party("b", None).unwrap();
        assert_eq!(revocations_in_force(&pki, &db).unwrap().version(), 2);
        std::fs::write(pki.revocation_file(), &v1).unwrap();
        let kept = revocations_in_force(&pki, &db).unwrap();
        assert_eq!(kept.version(), 2, "the older file is not applied");
        let b_der = confide_proto::net::load_certs(&pki.party_cert("b")).unwrap()[0].to_vec();
        assert!(kept.check("b", &b_der).is_err(), "b stays revoked");
        std::fs::remove_file(pki.revocation_file()).unwrap();
        assert_eq!(revocations_in_force(&pki, &db).unwrap().version(), 2, "nor is a missing one");
        // A federation re-keyed under a new CA: the kept list is not its
        // CA's, so the directory's list is taken, and the coordinator starts.
        let rekeyed = PkiDir::new(dir.path().join("pki2"));
        rekeyed.init("t2", &["a".into()], &[]).unwrap();
        assert_eq!(revocations_in_force(&rekeyed, &db).unwrap().version(), 0);
        assert_eq!(revocations_in_force(&rekeyed, &db).unwrap().version(), 0);
    }

    /// Names a relay makes up (its members' certificates are read only
    /// after the budget) neither grow the budgets without end nor make
    /// each join scan them: past the bound a made-up name gets no budget of
    /// its own (the relay's still applies), parties' own names still do,
    /// and budgets already held keep counting (found by review).
    #[test]
    fn made_up_member_names_cannot_grow_the_join_budgets() {
        let dir = tempfile::tempdir().unwrap();
        let hub = bare_hub(dir.path());
        for _ in 0..30 {
            hub.take_relayed_join("edge-a", Some("looping")).unwrap();
        }
        for i in 0..(2 * JoinBudgets::MANY) {
            let relay = format!("edge-{}", i / 1000);
            let _ = hub.take_relayed_join(&relay, Some(&format!("made-up-{i}")));
        }
        let _ = hub.take_relayed_join("edge-z", Some("NOT A NAME"));
        let kept = lock(&hub.joins).by_key.len();
        assert!(kept <= JoinBudgets::MANY + 64, "{kept} budgets kept");
        assert!(!lock(&hub.joins).by_key.contains_key("relay edge-z member NOT A NAME"));
        hub.take_join("hospital-new").unwrap();
        assert!(lock(&hub.joins).by_key.contains_key("hospital-new"), "a party's own name always gets a budget");
        let e = hub.take_relayed_join("edge-a", Some("looping")).unwrap_err();
        assert!(e.message().contains("looping (through relay edge-a)"), "{}", e.message());
    }

    /// A job's receiving end, read as inputs.
    struct JobEnd(std::sync::mpsc::Receiver<Routed>);

    impl JobEnd {
        fn try_recv(&self) -> Result<Input, std::sync::mpsc::TryRecvError> {
            self.0.try_recv().map(|r| r.input)
        }
    }

    /// A party the job names cannot pile its messages up in the job's
    /// inputs: at most MAX_UNREAD_PER_PARTY wait unhandled, then its stream
    /// is closed, naming why; a message read frees its place, and other
    /// parties are not held to its count.
    #[test]
    fn a_party_cannot_pile_up_messages_a_job_has_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let hub = bare_hub(dir.path());
        let (inputs, job) = std::sync::mpsc::channel();
        let named = Arc::new(["hospital-a".to_string(), "hospital-b".to_string()].into());
        lock(&hub.jobs).insert("job-1".into(), JobHandle::new(inputs, named));
        let cut = Cut::default();
        lock(&hub.parties).insert("hospital-a".into(), party_conn(1, &cut).0);
        lock(&hub.parties).insert("hospital-b".into(), party_conn(2, &cut).0);
        let failed = |task_id| pb::PartyMessage {
            body: Some(party_message::Body::Failed(pb::TaskFailed {
                job_id: "job-1".into(),
                task_id,
                reason: "x".into(),
            })),
        };
        let mut pending = None;
        for t in 0..MAX_UNREAD_PER_PARTY as u64 {
            on_party_message(&hub, "hospital-a", 1, failed(t), &mut pending).unwrap();
        }
        let e = on_party_message(&hub, "hospital-a", 1, failed(99), &mut pending).unwrap_err();
        assert!(e.contains("wait unhandled"), "{e}");
        // Another party's messages still go through.
        on_party_message(&hub, "hospital-b", 2, failed(1), &mut pending).unwrap();
        // One read, one more place.
        drop(job.try_recv().unwrap());
        on_party_message(&hub, "hospital-a", 1, failed(100), &mut pending).unwrap();
        on_party_message(&hub, "hospital-a", 1, failed(101), &mut pending).unwrap_err();
        assert_eq!(job.try_iter().count(), MAX_UNREAD_PER_PARTY + 1);
        on_party_message(&hub, "hospital-a", 1, failed(102), &mut pending).unwrap();
    }

    /// What one party can make the coordinator send another, or hold for
    /// it, is bounded (review findings): answers only to requests relayed
    /// (each once, at most 64 waiting per edge, forgotten after their
    /// wait), cloud keys for at most 64 services per party (a repeat is
    /// not sent again), and model pulls read one at a time per stream.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn party_to_party_traffic_is_only_what_was_asked() {
        let dir = tempfile::tempdir().unwrap();
        let hub = bare_hub(dir.path());
        let cut = Cut::default();
        let (edge, mut edge_queue, _, _edge_ended) = party_conn(1, &cut);
        let (cloud, mut cloud_queue, _, _cloud_ended) = party_conn(2, &cut);
        lock(&hub.parties).insert("edge".into(), edge);
        lock(&hub.parties).insert("cloud".into(), cloud);
        let mut pending = None;
        let answer = |id| pb::PartyMessage {
            body: Some(party_message::Body::ForwardAnswer(pb::ForwardAnswer {
                request_id: id,
                peer: "edge".into(),
                ciphertext: vec![1; 16],
                error: String::new(),
            })),
        };
        // An answer to nothing relayed: not passed on.
        on_party_message(&hub, "cloud", 2, answer(7), &mut pending).unwrap();
        assert!(edge_queue.try_recv().is_err(), "an answer nobody asked for reached the edge");
        // Relayed, answered once.
        assert!(hub.forwarding("cloud", "edge", 7, Duration::from_secs(5)));
        on_party_message(&hub, "cloud", 2, answer(7), &mut pending).unwrap();
        assert!(matches!(edge_queue.try_recv(), Ok(Outbound::Msg(coordinator_message::Body::ForwardAnswer(_)))));
        on_party_message(&hub, "cloud", 2, answer(7), &mut pending).unwrap();
        assert!(edge_queue.try_recv().is_err(), "answered twice");
        // At most 64 waiting per edge; a forgotten one makes room.
        for id in 0..MAX_FORWARDS_PER_EDGE as u64 {
            assert!(hub.forwarding("cloud", "edge", 100 + id, Duration::from_secs(60)));
        }
        assert!(!hub.forwarding("cloud", "edge", 999, Duration::from_secs(60)));
        assert!(hub.forwarding("cloud", "other-edge", 999, Duration::from_secs(60)), "per edge");
        lock(&hub.forwards).values_mut().for_each(|until| *until = std::time::Instant::now());
        assert!(hub.forwarding("cloud", "edge", 999, Duration::from_secs(60)), "forgotten after their wait");
        // Cloud keys: a repeat is not sent again; at most 64 services.
        let key = |service: &str| pb::PartyMessage {
            body: Some(party_message::Body::CloudKey(pb::CloudKey {
                service: service.into(),
                public_key: vec![7; 32],
                issued_at: 5,
                signature: vec![1; 64],
            })),
        };
        on_party_message(&hub, "cloud", 2, key("svc0"), &mut pending).unwrap();
        assert!(edge_queue.try_recv().is_ok() && cloud_queue.try_recv().is_ok());
        let mut resigned = key("svc0");
        if let Some(party_message::Body::CloudKey(k)) = resigned.body.as_mut() {
            k.signature = vec![2; 64];
        }
        on_party_message(&hub, "cloud", 2, resigned, &mut pending).unwrap();
        assert!(edge_queue.try_recv().is_err(), "a repeated key (signed again) was sent again");
        for i in 1..MAX_CLOUD_KEYS_PER_PARTY {
            on_party_message(&hub, "cloud", 2, key(&format!("svc{i}")), &mut pending).unwrap();
            let (_, _) = (edge_queue.try_recv(), cloud_queue.try_recv());
        }
        on_party_message(&hub, "cloud", 2, key("svc64"), &mut pending).unwrap();
        assert!(edge_queue.try_recv().is_err(), "a 65th service's key was sent");
        assert_eq!(lock(&hub.cloud_keys).len(), MAX_CLOUD_KEYS_PER_PARTY);
        // Pulls: read one at a time, one per service waiting (the newest);
        // with the stream's queue full, a loop of pulls holds no more.
        let pull = |service: &str, sequence| pb::PartyMessage {
            body: Some(party_message::Body::Pull(pb::ModelPull { service: service.into(), sequence })),
        };
        let filler = Outbound::Msg(coordinator_message::Body::Closed(pb::JobClosed::default()));
        lock(&hub.parties)["edge"].tx.try_send(filler).unwrap();
        for sequence in 1..=100 {
            on_party_message(&hub, "edge", 1, pull("triage", sequence), &mut pending).unwrap();
        }
        on_party_message(&hub, "edge", 1, pull("billing", 1), &mut pending).unwrap();
        let pulls = lock(&hub.parties)["edge"].pulls.clone();
        assert!(lock(&pulls).running && lock(&pulls).waiting.len() <= 2, "one reader, a pull per service waiting");
        // Read until the reader has ended (it ends once nothing waits, after
        // its last answer is queued), then what is left in the queue.
        let mut answered = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ended = !lock(&pulls).running;
            while let Ok(m) = edge_queue.try_recv() {
                if let Outbound::Model { service, sequence, bytes } = m {
                    assert!(bytes.is_err(), "no deployment here");
                    answered.push((service, sequence));
                }
            }
            if ended {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the pulls end: {answered:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answered.iter().any(|(s, q)| s == "triage" && *q == 100), "the newest pull of triage: {answered:?}");
        assert!(answered.iter().any(|(s, _)| s == "billing"), "{answered:?}");
        assert!(answered.len() <= 3, "{answered:?}");
        // Pulls of more services than a party serves at once: refused.
        lock(&pulls).running = true;
        for i in 0..MAX_SERVING_SERVICES {
            on_party_message(&hub, "edge", 1, pull(&format!("s{i}"), 1), &mut pending).unwrap();
        }
        let e = on_party_message(&hub, "edge", 1, pull("one-more", 1), &mut pending).unwrap_err();
        assert!(e.contains("model pulls of more than 256 services"), "{e}");
        // An edge's requests in flight go with its stream.
        assert!(lock(&hub.forwards).keys().any(|(_, e, _)| e == "edge"));
        assert!(hub.close_stream("edge", 1, Status::aborted("bye"), Closing::BehindItsQueue));
        assert!(!lock(&hub.forwards).keys().any(|(_, e, _)| e == "edge"));
    }

    #[test]
    fn serving_reports_are_bounded_named_and_without_repeats() {
        let ok = pb::ServingReport { services: vec![rows("triage"), rows("triage-cloud")] };
        assert!(check_serving_report(&ok).is_ok());
        let twice = pb::ServingReport { services: vec![rows("triage"), rows("triage")] };
        assert!(check_serving_report(&twice).unwrap_err().contains("triage listed twice"));
        let bad = pb::ServingReport { services: vec![rows("<script>")] };
        assert!(check_serving_report(&bad).unwrap_err().contains("not a service name"));
        let many = pb::ServingReport { services: (0..=MAX_SERVING_SERVICES).map(|i| rows(&format!("s{i}"))).collect() };
        assert!(check_serving_report(&many).unwrap_err().contains("at most 256"));
    }

    /// A services listing fits its budget whatever the number of services,
    /// whole services first, and says when some were left out.
    #[test]
    fn a_services_listing_keeps_what_fits_and_says_so() {
        let status = |i: usize| pb::ServiceStatus {
            service: format!("s{i}"),
            deployments: vec![pb::ServiceDeployment { record: vec![7; 1000], ..Default::default() }],
            ..Default::default()
        };
        let mut services: Vec<_> = (0..10).map(status).collect();
        let one = prost::Message::encoded_len(&services[0]) + 8;
        assert!(!keep_within(&mut services, 10 * one));
        assert_eq!(services.len(), 10);
        assert!(keep_within(&mut services, 4 * one + one / 2));
        let names: Vec<&str> = services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["s0", "s1", "s2", "s3"]);
    }
}
