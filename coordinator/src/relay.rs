//! `confide relay`: an intermediate aggregator for multi-tier deployments.
//!
//! Parties dial the relay as they would the coordinator (mutual TLS; the
//! relay's certificate has the relay role); the relay dials the coordinator
//! with its own certificate and opens one stream per party, with the
//! party's signed delegation ([`confide_crypto::relay`]) so the coordinator
//! knows whose stream it is. Everything is forwarded as it comes, except
//! the ciphertext uploads of `he` jobs: the relay holds a task's uploads
//! until every party it gave the task to has answered (or `hold` passed),
//! sums them ([`UploadGroup`]) and forwards one ciphertext with its
//! members' signed records. It needs no key and learns nothing: it sees
//! ciphertexts, signed records and what the coordinator sends the parties.
//! What it forwards is checked by the coordinator and the decryptors (see
//! docs/homomorphic-aggregation.md).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confide_crypto::aggregation::he::{self as he_protocol, relay::UploadGroup};
use confide_crypto::aggregation::{AggregationProtocol, Envelope};
use confide_crypto::identity::SharedRevocations;
use confide_proto::Limits;
use confide_proto::messages::{ResultBody, TaskResult};
use confide_proto::net::ClientIdentity;
use confide_proto::pb::party_service_client::PartyServiceClient;
use confide_proto::pb::party_service_server::{PartyService, PartyServiceServer};
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_proto::transfer::{self, Incoming};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::Error;
use crate::server::{BoxStream, CLOSE_GRACE, CUT_AFTER, Closable, MAX_STREAMS_PER_CONNECTION, cut_once_unused};
use crate::server::{RELAYED_CERT, RELAYED_NONCE, RELAYED_SIGNATURE, RELAYED_TIME};
use crate::tls::{self, Admission, Cut, connection_of, peer_certificate, peer_of};

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where parties dial it.
    pub listen: SocketAddr,
    /// The coordinator's address (`https://host:port`).
    pub coordinator: String,
    /// The name in the coordinator's certificate.
    pub server_name: String,
    /// The federation CA.
    pub ca: PathBuf,
    /// The relay's certificate (relay role) and key.
    pub cert: PathBuf,
    /// The relay's private key.
    pub key: PathBuf,
    /// How long a task's first upload waits for the other members'.
    pub hold: Duration,
    /// Message and vector limits (as the coordinator's).
    pub limits: Limits,
}

/// A running relay.
pub struct RunningRelay {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningRelay {
    /// Serves until the server stops.
    pub async fn wait(self) -> Result<(), Error> {
        self.join.await.map_err(|e| Error::Io(e.to_string()))?.map_err(|e| Error::Io(e.to_string()))
    }

    /// Stops serving.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = self.join.await;
    }
}

/// Starts a relay.
pub async fn start(config: RelayConfig) -> Result<RunningRelay, Error> {
    config.limits.validate().map_err(|e| Error::InvalidInput(e.to_string()))?;
    let own = confide_proto::net::load_certs(&config.cert).map_err(|e| Error::Tls(e.to_string()))?;
    let id = own
        .first()
        .map(|c| confide_crypto::pki::peer_identity(c))
        .transpose()
        .map_err(|e| Error::Tls(format!("{}: {e}", config.cert.display())))?
        .ok_or_else(|| Error::Tls(format!("{}: no certificate", config.cert.display())))?;
    if id.role != confide_crypto::pki::Role::Relay {
        return Err(Error::Tls(format!(
            "{}: a {:?} certificate; a relay needs one of the relay role (`confide certs relay`)",
            config.cert.display(),
            id.role
        )));
    }
    let tls_config = tls::server_config_with(&config.ca, &config.cert, &config.key)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listener.local_addr().map_err(|e| Error::Io(e.to_string()))?;
    let incoming = ReceiverStream::new(tls::accept_loop(listener, tls_config, Admission::Relay, None));
    let max = config.limits.max_message_bytes;
    let ca_pem = std::fs::read(&config.ca).map_err(|e| Error::io(&config.ca, e))?;
    // The list kept from a previous run: a relay restarted is not back to
    // checking nothing until a party is welcomed.
    let kept = match std::fs::read(revocation_list_path(&config)) {
        Ok(bytes) => confide_crypto::revocation::Revocations::parse(&bytes, &ca_pem, "the relay's kept list")
            .map_err(|e| Error::InvalidInput(format!("{}: {e}", revocation_list_path(&config).display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => confide_crypto::revocation::Revocations::empty(),
        Err(e) => return Err(Error::io(&revocation_list_path(&config), e)),
    };
    let shared = Arc::new(Shared {
        name: id.name.clone(),
        revocations: Arc::new(std::sync::RwLock::new(kept)),
        ca_pem,
        config,
        jobs: Mutex::default(),
        pending: Mutex::default(),
        flushed: Mutex::default(),
        members: Mutex::default(),
        rounds: Mutex::default(),
        next_transfer: AtomicU64::new(1 << 62),
        next_pending: AtomicU64::new(1),
    });
    let svc =
        PartyServiceServer::new(RelaySvc { shared }).max_decoding_message_size(max).max_encoding_message_size(max);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let join = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .initial_stream_window_size(confide_proto::net::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(confide_proto::net::HTTP2_CONNECTION_WINDOW)
            .max_frame_size(confide_proto::net::HTTP2_MAX_FRAME)
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            }),
    );
    info!(%local_addr, relay = %id.name, "relay listening (mutual TLS 1.3)");
    Ok(RunningRelay { local_addr, shutdown: Some(shutdown_tx), join })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One party's stream to the coordinator: whole results go out under the
/// lock, so the relay's forwarded groups never interleave with the party's
/// own transfers.
type Upstream = Arc<tokio::sync::Mutex<mpsc::Sender<pb::PartyMessage>>>;

struct Shared {
    name: String,
    config: RelayConfig,
    /// The `he` jobs whose uploads the relay sums, and how long it holds
    /// a task's uploads in each.
    jobs: Mutex<HashMap<String, Duration>>,
    /// The newest revocation list the CA signed that the relay has seen
    /// (in what the coordinator sends its parties): checked against the
    /// coordinator's certificate on each upstream connection and against
    /// each party's before its stream is opened.
    revocations: SharedRevocations,
    /// The federation CA (PEM), which signs revocation lists.
    ca_pem: Vec<u8>,
    /// Upload tasks in progress, by (job, task id).
    pending: Mutex<HashMap<(String, u64), Pending>>,
    /// Upload tasks whose held uploads went out, by (job, task id): when,
    /// and whose; a member's later result for one is not forwarded.
    flushed: Mutex<HashMap<(String, u64), Flushed>>,
    /// The upstream of each connected party.
    members: Mutex<HashMap<String, Member>>,
    /// The `he` keygen rounds in progress, by (job, round): their round
    /// message and the parties asked to deal (the answers to the
    /// key-confirm step are the round's uploads).
    rounds: Mutex<HashMap<(String, u32), KeygenRound>>,
    next_transfer: AtomicU64,
    next_pending: AtomicU64,
}

#[derive(Clone)]
struct Member {
    conn: u64,
    up: Upstream,
    /// The party's connection to the relay.
    cut: Cut,
}

/// One member's upload, held until its group is summed.
struct Held {
    /// The connection it came on: a member that reconnected since is not
    /// asked to carry the sum, and its upload is not counted.
    conn: u64,
    result: TaskResult,
    contribution: Envelope,
    certificate: Arc<[u8]>,
}

/// One task whose answers are ciphertext uploads.
struct Pending {
    /// Tells a re-created entry from the one a timer was started for.
    id: u64,
    created: Instant,
    round_message: Vec<u8>,
    /// Parties given the task that may still answer.
    expected: BTreeSet<String>,
    held: HashMap<String, Held>,
    timer: bool,
}

/// Where the relay keeps the newest revocation list it has seen: beside its
/// key (`KEY.crl.pem`, as a party keeps its own).
fn revocation_list_path(config: &RelayConfig) -> PathBuf {
    config.key.with_extension("crl.pem")
}

/// When a task's held uploads went out, and whose.
type Flushed = (Instant, BTreeSet<String>);

/// A keygen round's message, the relay's parties asked to deal in it, and
/// when the relay saw it start.
type KeygenRound = (Vec<u8>, BTreeSet<String>, Instant);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// How long state of a task or keygen round that never finished is kept.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

impl Shared {
    /// A revocation list the coordinator sent a party: kept when the CA
    /// signed it and it is newer than the one held (the parties judge an
    /// older one; the relay only ignores it).
    fn on_revocations(&self, crl: &[u8]) {
        let keep_at = revocation_list_path(&self.config);
        match confide_proto::net::adopt_revocations(
            &self.revocations,
            crl,
            &self.ca_pem,
            "the coordinator's list",
            &keep_at,
        ) {
            Ok(Some(version)) => info!(version, "revocation list updated"),
            Ok(None) => {}
            Err(e) => warn!("a revocation list the coordinator sent is not taken: {e}"),
        }
    }

    fn is_he(&self, job: &str) -> bool {
        lock(&self.jobs).contains_key(job)
    }

    /// How long a task's first upload in `job` waits for the others: the
    /// relay's `hold`, but at most a quarter of the job's stage timeout
    /// and of its straggler cut, so that the sum still reaches the
    /// coordinator in time (a slow member must not take its fast
    /// group-mates past the cut).
    fn hold(&self, job: &str) -> Duration {
        lock(&self.jobs).get(job).copied().unwrap_or(self.config.hold)
    }

    /// Notes a job offer: an `he` job's uploads are summed.
    fn on_offer(&self, offer: &pb::JobOffer) {
        let Ok(spec) = toml::from_str::<toml::Table>(&offer.spec_toml) else { return };
        let protocol = spec.get("aggregation").and_then(|a| a.get("protocol")).and_then(|p| p.as_str());
        if protocol != Some(he_protocol::ThresholdHe.name()) {
            return;
        }
        let timeout = |name: &str| {
            spec.get("timeouts")
                .and_then(|t| t.get(name))
                .and_then(|v| v.as_integer())
                .and_then(|v| u64::try_from(v).ok())
        };
        // The spec's default stage timeout is 300 s (confide_proto::jobspec::Timeouts).
        let stage_secs = timeout("round_secs").unwrap_or(300);
        let quarter = |secs: u64| Duration::from_millis(secs.saturating_mul(1000) / 4);
        let mut hold = self.config.hold.min(quarter(stage_secs.max(4)));
        if let Some(straggler) = timeout("straggler_secs") {
            hold = hold.min(quarter(straggler.max(1)));
        }
        lock(&self.jobs).insert(offer.job_id.clone(), hold);
    }

    /// Notes a task going down to `party`: an upload task of an `he` job
    /// starts (or joins) the group expected to answer it: the relay's
    /// connected parties among the round's (or, for key confirmation, among
    /// those it saw asked to deal), so the group does not close before a
    /// member's task has even arrived.
    fn on_task(&self, party: &str, task: &pb::Task) {
        if !self.is_he(&task.job_id) {
            return;
        }
        // State of tasks that never completed (every member failed) goes
        // after a while, so a long-running relay does not grow.
        lock(&self.pending).retain(|_, p| p.created.elapsed() < FORGET_AFTER.max(self.config.hold * 4));
        lock(&self.flushed).retain(|_, f| f.0.elapsed() < FORGET_AFTER);
        lock(&self.rounds).retain(|_, r| r.2.elapsed() < FORGET_AFTER);
        use pb::task::Body;
        let round = (task.job_id.clone(), task.round);
        let (round_message, among): (Vec<u8>, BTreeSet<String>) = match &task.body {
            Some(Body::Fit(pb::FitTask { round_message, .. }))
            | Some(Body::SecureSum(pb::SecureSumTask { round_message, .. })) => {
                let Ok(rc) = Envelope::body(round_message.clone())
                    .decode::<he_protocol::wire::RoundConfig>("coordinator", "round config")
                else {
                    return;
                };
                if rc.keygen {
                    lock(&self.rounds).insert(round, (round_message.clone(), BTreeSet::new(), Instant::now()));
                    return;
                }
                (round_message.clone(), rc.parties.into_iter().collect())
            }
            Some(Body::Aggregation(s)) if s.stage == he_protocol::KEY_DEAL.as_str() => {
                if let Some((_, dealers, _)) = lock(&self.rounds).get_mut(&round) {
                    dealers.insert(party.to_owned());
                }
                return;
            }
            Some(Body::Aggregation(s)) if s.stage == he_protocol::KEY_CONFIRM.as_str() => {
                match lock(&self.rounds).get(&round).cloned() {
                    Some((rm, dealers, _)) => (rm, dealers),
                    None => {
                        debug!(job = %task.job_id, "key confirmation of a round this relay did not see start");
                        return;
                    }
                }
            }
            _ => return,
        };
        let connected: BTreeSet<String> = lock(&self.members).keys().cloned().collect();
        let key = (task.job_id.clone(), task.task_id);
        let mut p = lock(&self.pending);
        // The coordinator sends the task again (a restarted coordinator
        // reuses a round's task ids): the party's next answer is a new one.
        if let Some(f) = lock(&self.flushed).get_mut(&key) {
            f.1.remove(party);
        }
        let entry = p.entry(key).or_insert_with(|| Pending {
            id: self.next_pending.fetch_add(1, Ordering::Relaxed),
            created: Instant::now(),
            round_message,
            expected: connected.intersection(&among).cloned().collect(),
            held: HashMap::new(),
            timer: false,
        });
        entry.expected.insert(party.to_owned());
    }

    /// A result from `party` on connection `conn`: an upload it holds, or
    /// `Some` to forward.
    fn on_result(
        self: &Arc<Self>,
        party: &str,
        conn: u64,
        certificate: &Arc<[u8]>,
        result: TaskResult,
    ) -> Option<TaskResult> {
        let key = (result.job_id.clone(), result.task_id);
        // A member's second result for a task whose first is held, or went
        // into a group sum, is dropped: forwarded, the coordinator would
        // count it and then leave the group out as uploaded twice (review
        // finding: one member could so take its whole group out).
        // `pending` first, as `flush` takes them: a flush cannot come
        // between the two checks.
        let mut pending = lock(&self.pending);
        if lock(&self.flushed).get(&key).is_some_and(|f| f.1.contains(party)) {
            warn!(party = %party, job = %key.0, task = key.1, "a second result for a task whose upload went out; dropped");
            return None;
        }
        let Some(p) = pending.get_mut(&key) else { return Some(result) };
        if p.held.contains_key(party) {
            warn!(party = %party, job = %key.0, task = key.1, "a second result for a task whose upload is held; dropped");
            return None;
        }
        if !p.expected.contains(party) {
            return Some(result);
        }
        let (result, contribution) = take_contribution(result);
        let Some(contribution) = contribution else { return Some(result) };
        p.held.insert(party.to_owned(), Held { conn, result, contribution, certificate: certificate.clone() });
        let timer = (!p.timer).then_some(p.id);
        p.timer = true;
        drop(pending);
        if let Some(id) = timer {
            let (shared, key2) = (self.clone(), key.clone());
            let hold = self.hold(&key.0);
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                shared.flush(&key2, Some(id), "hold time over");
            });
        }
        self.maybe_flush(&key);
        None
    }

    /// `party` will not answer task `key` (or, with `None`, any task: its
    /// connection `conn` ended), unless it has since reconnected.
    fn gone(&self, party: &str, conn: u64, key: Option<&(String, u64)>) {
        if lock(&self.members).get(party).is_some_and(|m| m.conn != conn) {
            return;
        }
        let keys: Vec<(String, u64)> = {
            let mut pending = lock(&self.pending);
            pending
                .iter_mut()
                .filter(|(k, _)| key.is_none_or(|x| x == *k))
                .filter_map(|(k, p)| {
                    // Its upload goes too: it cannot hash, so counting it
                    // would only get the whole group left out.
                    let held = p.held.remove(party).is_some();
                    (p.expected.remove(party) || held).then(|| k.clone())
                })
                .collect()
        };
        for k in keys {
            self.maybe_flush(&k);
        }
    }

    fn maybe_flush(&self, key: &(String, u64)) {
        let complete = lock(&self.pending)
            .get(key)
            .is_some_and(|p| !p.held.is_empty() && p.expected.iter().all(|m| p.held.contains_key(m)));
        if complete {
            self.flush(key, None, "every member answered");
        }
    }

    /// Sums the uploads held for task `key` (when `id` is given, only if
    /// the entry is still the one it names) and forwards them: one sum on
    /// the stream of a member still connected on the connection it
    /// uploaded on; an upload that cannot be added goes as it came, for
    /// the coordinator to judge.
    fn flush(&self, key: &(String, u64), id: Option<u64>, why: &str) {
        let p = {
            let mut pending = lock(&self.pending);
            if id.is_some_and(|id| pending.get(key).is_none_or(|p| p.id != id)) {
                return;
            }
            let Some(p) = pending.remove(key) else { return };
            let members = p.held.keys().cloned().collect();
            lock(&self.flushed).insert(key.clone(), (Instant::now(), members));
            p
        };
        let upstreams = lock(&self.members).clone();
        let mut group = match UploadGroup::new(&self.name, &p.round_message) {
            Ok(g) => g,
            Err(e) => {
                warn!(job = %key.0, "cannot group this task's uploads: {e}");
                return;
            }
        };
        let mut results: HashMap<String, TaskResult> = HashMap::new();
        let mut as_they_came = Vec::new();
        let mut held: Vec<(String, Held)> = p.held.into_iter().collect();
        held.sort_by(|a, b| a.0.cmp(&b.0));
        for (party, h) in held {
            if upstreams.get(&party).is_none_or(|m| m.conn != h.conn) {
                warn!(party = %party, "left after uploading; its upload is not forwarded");
                continue;
            }
            if he_protocol::relay::claims_a_group(&h.contribution) {
                // The party's doing, not this relay's: the coordinator is
                // told so on the party's stream, and drops it from the stage.
                warn!(party = %party, "an upload claiming a relay group's fields: refused as the party's");
                let why = format!(
                    "it sent relay {} an upload record with a relay group's fields (refused as its own doing)",
                    self.name
                );
                if let Some(member) = upstreams.get(&party) {
                    let (up, msg) = (member.up.clone(), task_failed(&key.0, key.1, why));
                    tokio::spawn(async move {
                        let _ = up.lock().await.send(msg).await;
                    });
                }
                continue;
            }
            match group.add(&party, &h.certificate, h.contribution.clone()) {
                Ok(()) => {
                    results.insert(party, h.result);
                }
                Err(e) => {
                    warn!(party = %party, "an upload the relay cannot add, forwarded as it came: {e}");
                    let mut r = h.result;
                    put_contribution(&mut r, h.contribution);
                    as_they_came.push((party, r));
                }
            }
        }
        let members = group.len();
        if members > 0 {
            info!(job = %key.0, task = key.1, members, "forwarding a group sum ({why})");
        }
        let leader = results.keys().next().cloned();
        let mut out: Vec<(String, TaskResult)> = as_they_came;
        for (party, envelope) in group.finish_led_by(leader.as_deref()) {
            if let Some(mut r) = results.remove(&party) {
                put_contribution(&mut r, envelope);
                out.push((party, r));
            }
        }
        for (party, result) in out {
            let Some(member) = upstreams.get(&party) else { continue };
            let (up, limits, id) =
                (member.up.clone(), self.config.limits, self.next_transfer.fetch_add(1, Ordering::Relaxed));
            tokio::spawn(async move { send_result(&up, result, id, limits.chunk_bytes).await });
        }
    }
}

/// A party's task failed, as the relay tells the coordinator on the
/// party's stream.
fn task_failed(job_id: &str, task_id: u64, reason: String) -> pb::PartyMessage {
    let failed = pb::TaskFailed { job_id: job_id.to_owned(), task_id, reason };
    pb::PartyMessage { body: Some(party_message::Body::Failed(failed)) }
}

/// Splits an upload's contribution off its result.
fn take_contribution(mut r: TaskResult) -> (TaskResult, Option<Envelope>) {
    let empty = || Envelope::body(Vec::new());
    let taken = match &mut r.body {
        ResultBody::Fit { contribution, .. } | ResultBody::SecureSum { contribution } => {
            Some(std::mem::replace(contribution, empty()))
        }
        ResultBody::Aggregation { stage, message } if stage == he_protocol::KEY_CONFIRM.as_str() => {
            Some(std::mem::replace(message, empty()))
        }
        _ => None,
    };
    (r, taken)
}

fn put_contribution(r: &mut TaskResult, e: Envelope) {
    match &mut r.body {
        ResultBody::Fit { contribution, .. } | ResultBody::SecureSum { contribution } => *contribution = e,
        ResultBody::Aggregation { message, .. } => *message = e,
        _ => {}
    }
}

/// Sends one whole result (header and chunks) under the party's upstream lock.
async fn send_result(up: &Upstream, result: TaskResult, transfer_id: u64, chunk_bytes: usize) {
    let (mut msg, bulk) = result.into_wire();
    let encoded = bulk.as_ref().map(|b| transfer::encode(transfer_id, b));
    msg.bulk = encoded.as_ref().map(|e| e.header.clone());
    let tx = up.lock().await;
    let wrap = |b| pb::PartyMessage { body: Some(b) };
    if tx.send(wrap(party_message::Body::Result(msg))).await.is_err() {
        return;
    }
    if let Some(e) = &encoded {
        for chunk in transfer::chunks(transfer_id, &e.bytes, chunk_bytes) {
            if tx.send(wrap(party_message::Body::Chunk(chunk))).await.is_err() {
                return;
            }
        }
    }
}

struct RelaySvc {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl PartyService for RelaySvc {
    type JoinStream = BoxStream<pb::CoordinatorMessage>;

    async fn join(&self, req: Request<Streaming<pb::PartyMessage>>) -> Result<Response<Self::JoinStream>, Status> {
        let id = peer_of(&req)?;
        let party = id.name;
        let certificate = peer_certificate(&req)?;
        let cut = connection_of(&req)?.cut.clone();
        let mut inbound = req.into_inner();
        // The first message carries the party's delegation to this relay.
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::PartyMessage { body: Some(party_message::Body::Hello(h)) }))) => h,
            _ => return Err(Status::invalid_argument(format!("{party}: the first message must be a hello"))),
        };
        if hello.relay_delegation.is_empty() {
            return Err(Status::unauthenticated(format!(
                "{party}: no delegation to relay {} in its hello (an older party?)",
                self.shared.name
            )));
        }
        // The coordinator checks too, but a revoked party costs the relay
        // no connection to it.
        let revoked = self.shared.revocations.read().unwrap_or_else(|p| p.into_inner()).check(&party, &certificate);
        if let Err(e) = revoked {
            warn!(party = %party, "refused a revoked party: {e}");
            return Err(Status::permission_denied(format!("{party}: {e}")));
        }
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let client_id = ClientIdentity {
            url: &cfg.coordinator,
            server_name: &cfg.server_name,
            ca: &cfg.ca,
            cert: &cfg.cert,
            key: &cfg.key,
        };
        // Only the coordinator, at every handshake (the channel reconnects
        // by itself: checked once after connecting, a reconnection could
        // reach any server of the federation; found by review).
        let (channel, shown) = confide_proto::net::connect_to(
            &client_id,
            Some(shared.revocations.clone()),
            &[confide_crypto::pki::Role::Coordinator],
        )
        .await
        .map_err(|e| Status::unavailable(format!("relay {}: {e}", shared.name)))?;
        // Only the coordinator: never another relay or a party's certificate.
        let upstream_role = shown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|c| confide_crypto::pki::peer_identity(c).ok())
            .map(|id| id.role);
        if upstream_role != Some(confide_crypto::pki::Role::Coordinator) {
            return Err(Status::unavailable(format!(
                "relay {}: {} does not show a coordinator certificate",
                shared.name, cfg.coordinator
            )));
        }
        let max = cfg.limits.max_message_bytes;
        let mut client = PartyServiceClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max);
        let (up_tx, up_rx) = mpsc::channel::<pb::PartyMessage>(32);
        let _ = up_tx.send(pb::PartyMessage { body: Some(party_message::Body::Hello(hello.clone())) }).await;
        let mut request = Request::new(ReceiverStream::new(up_rx));
        let meta = request.metadata_mut();
        meta.insert_bin(RELAYED_CERT, tonic::metadata::MetadataValue::from_bytes(&certificate));
        meta.insert_bin(RELAYED_SIGNATURE, tonic::metadata::MetadataValue::from_bytes(&hello.relay_delegation));
        meta.insert_bin(RELAYED_NONCE, tonic::metadata::MetadataValue::from_bytes(&hello.delegation_nonce));
        meta.insert(
            RELAYED_TIME,
            hello.delegation_time.to_string().parse().map_err(|_| Status::internal("delegation time"))?,
        );
        let upstream = client.join(request).await?.into_inner();
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let up: Upstream = Arc::new(tokio::sync::Mutex::new(up_tx));
        lock(&shared.members).insert(party.clone(), Member { conn, up: up.clone(), cut: cut.clone() });
        info!(party = %party, "party connected; its stream goes to the coordinator");
        let (down_tx, down_rx) = mpsc::channel::<Result<pb::CoordinatorMessage, Status>>(32);
        let (close, closed) = oneshot::channel();
        let (dropped, ended) = oneshot::channel();
        let down = Down { tx: down_tx, close, ended, cut, conn };
        tokio::spawn(pump_down(shared.clone(), party.clone(), upstream, down, SHUT_TIMING));
        tokio::spawn(pump_up(shared, party, conn, certificate, inbound, up));
        Ok(Response::new(Box::pin(Closable::new(closed, down_rx, dropped))))
    }
}

/// The party's side of a relayed stream: its queue, and how to end it if
/// the party stops reading.
struct Down {
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    /// Ends the stream ahead of its queue ([`Closable`]).
    close: oneshot::Sender<Status>,
    /// Resolves (closed) once the server has dropped the stream's response.
    ended: oneshot::Receiver<()>,
    /// The party's connection to the relay.
    cut: Cut,
    /// The stream's number among the relay's ([`Member::conn`]).
    conn: u64,
}

/// How long [`pump_down`] and [`end_down`] wait at each step.
#[derive(Clone, Copy)]
struct ShutTiming {
    /// What is left, and the end, behind the stream's queue.
    grace: Duration,
    /// The end ahead of the queue, before the connection is cut.
    cut_after: Duration,
    /// A full queue that frees no room for this long: the party does not
    /// read, and its stream is ended.
    stall: Duration,
}

/// The coordinator's own steps ([`crate::server`]'s `shut`), and a minute
/// for a party to take one message (a 256 KiB chunk) off a full queue.
const SHUT_TIMING: ShutTiming = ShutTiming { grace: CLOSE_GRACE, cut_after: CUT_AFTER, stall: STALL };

/// See [`ShutTiming::stall`].
const STALL: Duration = Duration::from_secs(60);

/// Coordinator → party, as it comes; tasks are noted on the way. While
/// the party's queue is full, one more message is read from the
/// coordinator, so that the coordinator's end of the stream (it closes a
/// party that does not read, and cuts the relay's connection for it) is
/// seen here too, and passed on by [`end_down`]; a queue that frees no
/// room for `timing.stall` ends the stream the same way, whatever the
/// coordinator sends after that one message.
async fn pump_down(
    shared: Arc<Shared>,
    party: String,
    mut upstream: impl Stream<Item = Result<pb::CoordinatorMessage, Status>> + Unpin,
    down: Down,
    timing: ShutTiming,
) {
    let mut next: Option<pb::CoordinatorMessage> = None;
    // Messages not yet passed on, and how the coordinator's stream ended
    // (`None`: without an error).
    let (left, end): (Vec<pb::CoordinatorMessage>, Option<Status>) = 'pump: loop {
        let msg = match next.take() {
            Some(m) => m,
            None => match upstream.next().await {
                Some(Ok(m)) => m,
                None => break (Vec::new(), None),
                Some(Err(status)) => break (Vec::new(), Some(status)),
            },
        };
        note_down(&shared, &party, &msg);
        let stalled = tokio::time::sleep(timing.stall);
        tokio::pin!(stalled);
        loop {
            tokio::select! {
                permit = down.tx.reserve() => match permit {
                    Ok(p) => {
                        p.send(Ok(msg));
                        break;
                    }
                    // The party's side is gone: nothing more to pass on.
                    Err(_) => return,
                },
                read = upstream.next(), if next.is_none() => match read {
                    Some(Ok(m)) => next = Some(m),
                    None => break 'pump (vec![msg], None),
                    Some(Err(status)) => break 'pump (vec![msg], Some(status)),
                },
                () = &mut stalled => {
                    // The message read ahead is noted too (a job's close
                    // in it clears the relay's state of that job).
                    if let Some(n) = &next {
                        note_down(&shared, &party, n);
                    }
                    let why = format!("the party took nothing off its full queue for {} s", timing.stall.as_secs());
                    break 'pump (std::iter::once(msg).chain(next.take()).collect(), Some(Status::resource_exhausted(why)));
                }
            }
        }
    };
    // The coordinator's side goes now: it sees this stream end.
    drop(upstream);
    match &end {
        None => info!(party = %party, "the coordinator closed the party's stream"),
        Some(status) => warn!(party = %party, "ending the party's stream: {}", status.message()),
    }
    {
        let mut members = lock(&shared.members);
        if members.get(&party).is_some_and(|m| m.conn == down.conn) {
            members.remove(&party);
        }
    }
    shared.gone(&party, down.conn, None);
    end_down(&shared, &party, down, left, end, timing).await;
}

/// What a message from the coordinator tells the relay.
fn note_down(shared: &Shared, party: &str, msg: &pb::CoordinatorMessage) {
    match &msg.body {
        Some(coordinator_message::Body::Welcome(w)) => {
            if let Some(list) = &w.revocations {
                shared.on_revocations(&list.crl);
            }
        }
        Some(coordinator_message::Body::Revocations(list)) => shared.on_revocations(&list.crl),
        Some(coordinator_message::Body::Offer(o)) => shared.on_offer(o),
        Some(coordinator_message::Body::Task(t)) => shared.on_task(party, t),
        Some(coordinator_message::Body::Closed(c)) => {
            lock(&shared.jobs).remove(&c.job_id);
            lock(&shared.pending).retain(|k, _| k.0 != c.job_id);
            lock(&shared.rounds).retain(|k, _| k.0 != c.job_id);
        }
        _ => {}
    }
}

/// Ends the party's stream once the coordinator's has ended, as the
/// coordinator ends its own streams: what is `left` and the `end` behind
/// the stream's queue; ahead of it after `timing.grace` (a party whose
/// stream window is full is sent nothing more: the server stops polling
/// its stream); and after `timing.cut_after` more, its connection cut,
/// unless another of the relay's current streams uses it (a reconnect on
/// it), checked again until the stream ends.
async fn end_down(
    shared: &Shared,
    party: &str,
    down: Down,
    left: Vec<pb::CoordinatorMessage>,
    end: Option<Status>,
    timing: ShutTiming,
) {
    let Down { tx, close, mut ended, cut, conn } = down;
    let ahead = end.clone().unwrap_or_else(|| Status::unavailable("the coordinator ended the party's stream"));
    let behind = async {
        for m in left {
            if tx.send(Ok(m)).await.is_err() {
                return;
            }
        }
        if let Some(status) = end {
            let _ = tx.send(Err(status)).await;
        }
        // The queue's sender goes: the stream ends once it is drained.
        drop(tx);
        let _ = (&mut ended).await;
    };
    if tokio::time::timeout(timing.grace, behind).await.is_ok() {
        return;
    }
    let _ = close.send(ahead);
    cut_once_unused(party, &mut ended, &cut, timing.cut_after, || {
        lock(&shared.members).values().any(|m| m.conn != conn && m.cut.same(&cut))
    })
    .await;
}

/// Party → coordinator: whole results (reassembled), uploads of `he` jobs
/// held for their group.
async fn pump_up(
    shared: Arc<Shared>,
    party: String,
    conn: u64,
    certificate: Arc<[u8]>,
    mut inbound: impl Stream<Item = Result<pb::PartyMessage, Status>> + Unpin,
    up: Upstream,
) {
    let mut pending: Option<(pb::TaskResult, Incoming)> = None;
    let limits = shared.config.limits;
    // A stream a newer one of the party's replaced, or whose upstream to the
    // coordinator ended, is left at once, not at its next message (a party
    // that stops sending on it would otherwise keep its reader, and a
    // half-received result, for as long as the connection lives).
    let mut recheck = tokio::time::interval(super::server::READER_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Why the stream ends, and the task whose result was at fault when the
    // party sent one the relay cannot read: that task is failed upstream
    // with the reason, as the coordinator fails a malformed result it
    // receives directly (not a bare disconnection; found by review).
    let (why, faulty): (String, Option<(String, u64)>) = loop {
        let next = tokio::select! {
            next = inbound.next() => next.transpose(),
            _ = recheck.tick() => {
                let current = lock(&shared.members).get(&party).is_some_and(|m| m.conn == conn);
                if !current {
                    break ("a newer stream of the party's replaced this one".to_owned(), None);
                }
                if up.lock().await.is_closed() {
                    break ("the coordinator's stream ended".to_owned(), None);
                }
                continue;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => break ("closed its stream".to_owned(), None),
            Err(s) => break (format!("stream failed: {}", s.message()), None),
        };
        let task_of = |r: &pb::TaskResult| Some((r.job_id.clone(), r.task_id));
        let complete = match msg.body {
            Some(party_message::Body::Result(mut r)) => {
                if let Some((held, _)) = &pending {
                    break ("a new result started before the previous one's chunks ended".into(), task_of(held));
                }
                match r.bulk.take() {
                    None => Some((r, None)),
                    Some(h) => match Incoming::start(&h, &limits) {
                        Ok(inc) if inc.is_complete() => match inc.finish() {
                            Ok(b) => Some((r, Some(b))),
                            Err(e) => break (e.to_string(), task_of(&r)),
                        },
                        Ok(inc) => {
                            pending = Some((r, inc));
                            None
                        }
                        Err(e) => break (e.to_string(), task_of(&r)),
                    },
                }
            }
            Some(party_message::Body::Chunk(c)) => {
                let Some((held, inc)) = pending.as_mut() else { break ("a chunk without a transfer".into(), None) };
                if let Err(e) = inc.push(&c) {
                    break (e.to_string(), task_of(held));
                }
                if inc.is_complete() {
                    let Some((r, inc)) = pending.take() else { break ("lost transfer".into(), None) };
                    match inc.finish() {
                        Ok(b) => Some((r, Some(b))),
                        Err(e) => break (e.to_string(), task_of(&r)),
                    }
                } else {
                    None
                }
            }
            Some(party_message::Body::Failed(f)) => {
                shared.gone(&party, conn, Some(&(f.job_id.clone(), f.task_id)));
                let tx = up.lock().await;
                if tx.send(pb::PartyMessage { body: Some(party_message::Body::Failed(f)) }).await.is_err() {
                    break ("the coordinator's stream ended".into(), None);
                }
                None
            }
            other => {
                let tx = up.lock().await;
                if tx.send(pb::PartyMessage { body: other }).await.is_err() {
                    break ("the coordinator's stream ended".into(), None);
                }
                None
            }
        };
        let Some((r, bulk)) = complete else { continue };
        let task = task_of(&r);
        let result = match TaskResult::try_from((r, bulk)) {
            Ok(r) => r,
            Err(e) => break (format!("malformed result: {e}"), task),
        };
        if let Some(forward) = shared.on_result(&party, conn, &certificate, result) {
            let id = shared.next_transfer.fetch_add(1, Ordering::Relaxed);
            send_result(&up, forward, id, limits.chunk_bytes).await;
        }
    };
    if let Some((job_id, task_id)) = faulty {
        warn!(party = %party, job = %job_id, "a result the relay cannot read: {why}");
        let msg = task_failed(&job_id, task_id, format!("relay {} could not read its result: {why}", shared.name));
        let _ = up.lock().await.send(msg).await;
    }
    info!(party = %party, "party left: {why}");
    {
        let mut members = lock(&shared.members);
        if members.get(&party).is_some_and(|m| m.conn == conn) {
            members.remove(&party);
        }
    }
    shared.gone(&party, conn, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(hold_secs: u64) -> Shared {
        Shared {
            name: "edge-a".into(),
            revocations: Default::default(),
            ca_pem: Vec::new(),
            config: RelayConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                coordinator: "https://127.0.0.1:1".into(),
                server_name: "localhost".into(),
                ca: "ca.pem".into(),
                cert: "c.pem".into(),
                key: "k.pem".into(),
                hold: Duration::from_secs(hold_secs),
                limits: Limits::default(),
            },
            jobs: Mutex::default(),
            pending: Mutex::default(),
            flushed: Mutex::default(),
            members: Mutex::default(),
            rounds: Mutex::default(),
            next_transfer: AtomicU64::new(1),
            next_pending: AtomicU64::new(1),
        }
    }

    /// What the coordinator sends the relay for a party: `n` messages, and
    /// then the end of the stream.
    fn upstream(n: usize) -> ReceiverStream<Result<pb::CoordinatorMessage, Status>> {
        let (tx, rx) = mpsc::channel(n.max(1));
        for i in 0..n {
            let closed = pb::JobClosed { job_id: format!("j{i}"), ..Default::default() };
            tx.try_send(Ok(pb::CoordinatorMessage { body: Some(coordinator_message::Body::Closed(closed)) })).unwrap();
        }
        ReceiverStream::new(rx)
    }

    /// A party that reads nothing through the relay is cut off, however
    /// much the coordinator sent it before ending its stream: the relay's
    /// queue for it fills, the relay holds one message more, and it reads
    /// nothing further from the coordinator (here, not the stream's end);
    /// the full queue's stall ends the party's stream, ahead of its queue,
    /// and then its connection is cut. A party that reads gets every
    /// message and then the end, and keeps its connection.
    #[tokio::test]
    async fn a_party_that_reads_nothing_is_cut_off_whatever_the_coordinator_sent() {
        let ms = Duration::from_millis;
        let timing = ShutTiming { grace: ms(100), cut_after: ms(100), stall: ms(300) };
        let shared = Arc::new(shared(1));
        let down = |cut: &Cut| {
            let (tx, rx) = mpsc::channel(32);
            let (close, closed) = oneshot::channel();
            let (dropped, ended) = oneshot::channel::<()>();
            (Down { tx, close, ended, cut: cut.clone(), conn: 7 }, rx, closed, dropped)
        };
        let cut = Cut::default();
        let (stuck, _never_read, mut closed, _not_dropped) = down(&cut);
        let pump = tokio::spawn(pump_down(shared.clone(), "hospital-a".into(), upstream(40), stuck, timing));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cut.is_cut() {
            assert!(tokio::time::Instant::now() < deadline, "the connection is cut");
            tokio::time::sleep(ms(20)).await;
        }
        let ahead = closed.try_recv().expect("the end went ahead of the queue first");
        assert!(ahead.message().contains("took nothing off its full queue"), "{ahead:?}");
        pump.await.unwrap();

        let cut = Cut::default();
        let (reads, mut queue, mut closed, dropped) = down(&cut);
        // (A long grace: the reader has all the time it needs to see the end.)
        let timing = ShutTiming { grace: Duration::from_secs(30), ..timing };
        let pump = tokio::spawn(pump_down(shared, "hospital-b".into(), upstream(40), reads, timing));
        let mut got = 0;
        while let Some(m) = queue.recv().await {
            assert!(m.is_ok());
            got += 1;
        }
        drop(dropped);
        pump.await.unwrap();
        assert_eq!(got, 40);
        assert!(closed.try_recv().is_err() && !cut.is_cut());
    }

    /// A result the relay cannot read (here a bulk header of no known
    /// kind) fails its task upstream with the reason, as the coordinator
    /// fails one it receives directly, instead of a bare disconnection.
    #[tokio::test]
    async fn a_result_the_relay_cannot_read_fails_its_task_upstream() {
        let s = Arc::new(shared(30));
        let (tx, mut rx) = mpsc::channel(8);
        let up: Upstream = Arc::new(tokio::sync::Mutex::new(tx));
        s.members.lock().unwrap().insert("p0".into(), Member { conn: 7, up: up.clone(), cut: Cut::default() });
        let result = pb::TaskResult {
            job_id: "j1".into(),
            task_id: 9,
            bulk: Some(pb::BulkHeader { kind: 99, ..Default::default() }),
            ..Default::default()
        };
        let inbound =
            tokio_stream::iter(vec![Ok(pb::PartyMessage { body: Some(party_message::Body::Result(result)) })]);
        pump_up(s.clone(), "p0".into(), 7, Arc::from(Vec::new()), inbound, up).await;
        let sent = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
        let Some(party_message::Body::Failed(f)) = sent.body else { panic!("{sent:?}") };
        assert_eq!((f.job_id.as_str(), f.task_id), ("j1", 9));
        assert!(
            f.reason.contains("relay edge-a could not read its result") && f.reason.contains("bulk kind"),
            "{}",
            f.reason
        );
        assert!(!s.members.lock().unwrap().contains_key("p0"), "the stream ended");
    }

    /// A member's upload that claims a relay group's fields is not
    /// forwarded (the coordinator would blame this relay for it, the
    /// member never dropped): the member's task is failed upstream, naming
    /// it as the member's doing; a plain upload beside it still goes out.
    #[tokio::test]
    async fn a_members_upload_claiming_a_group_is_failed_as_its_own() {
        let s = Arc::new(shared(30));
        let key = ("he".to_string(), 4);
        let rc = he_protocol::wire::RoundConfig { dim: 8, parties: vec!["p0".into()], ..Default::default() };
        let mut streams = Vec::new();
        for (conn, p) in ["p0", "p1"].into_iter().enumerate() {
            let (tx, rx) = mpsc::channel(8);
            let member = Member { conn: conn as u64, up: Arc::new(tokio::sync::Mutex::new(tx)), cut: Cut::default() };
            s.members.lock().unwrap().insert(p.into(), member);
            streams.push(rx);
        }
        let held = |conn, record: he_protocol::wire::Upload| Held {
            conn,
            result: TaskResult {
                job_id: "he".into(),
                round: 2,
                task_id: 4,
                body: ResultBody::Fit { metrics: Default::default(), contribution: Envelope::body(Vec::new()) },
            },
            contribution: Envelope::body(prost::Message::encode_to_vec(&record)),
            certificate: Arc::from(Vec::new()),
        };
        let claims = he_protocol::wire::Upload { party: "p0".into(), relay: "edge-a".into(), ..Default::default() };
        assert!(he_protocol::relay::claims_a_group(&Envelope::body(prost::Message::encode_to_vec(&claims))));
        let plain = he_protocol::wire::Upload { party: "p1".into(), ..Default::default() };
        s.pending.lock().unwrap().insert(
            key.clone(),
            Pending {
                id: 1,
                created: Instant::now(),
                round_message: prost::Message::encode_to_vec(&rc),
                expected: ["p0".to_string(), "p1".to_string()].into(),
                held: [("p0".to_string(), held(0, claims)), ("p1".to_string(), held(1, plain))].into(),
                timer: false,
            },
        );
        s.flush(&key, None, "test");
        let first = tokio::time::timeout(Duration::from_secs(5), streams[0].recv()).await.unwrap().unwrap();
        let Some(party_message::Body::Failed(f)) = first.body else { panic!("{first:?}") };
        assert_eq!((f.job_id.as_str(), f.task_id), ("he", 4));
        assert!(f.reason.contains("relay edge-a") && f.reason.contains("its own doing"), "{}", f.reason);
        // The plain (here malformed) upload went out as it came.
        let second = tokio::time::timeout(Duration::from_secs(5), streams[1].recv()).await.unwrap().unwrap();
        assert!(matches!(second.body, Some(party_message::Body::Result(_))), "{second:?}");
    }

    /// A member's second result for an upload task, while its first is
    /// held or after it went out in a group, is dropped: forwarded, it
    /// would take the group out at the coordinator (review finding).
    #[tokio::test]
    async fn a_members_second_upload_is_not_forwarded() {
        let s = Arc::new(shared(30));
        let key = ("he".to_string(), 4);
        s.pending.lock().unwrap().insert(
            key.clone(),
            Pending {
                id: 1,
                created: Instant::now(),
                round_message: Vec::new(),
                expected: ["p0".to_string(), "p1".to_string()].into(),
                held: HashMap::new(),
                timer: false,
            },
        );
        let upload = || TaskResult {
            job_id: "he".into(),
            round: 2,
            task_id: 4,
            body: ResultBody::Fit { metrics: Default::default(), contribution: Envelope::body(vec![1]) },
        };
        let cert: Arc<[u8]> = Arc::from(Vec::new());
        assert!(s.on_result("p0", 1, &cert, upload()).is_none(), "held");
        assert!(s.on_result("p0", 1, &cert, upload()).is_none(), "a second one while held: dropped");
        assert_eq!(s.pending.lock().unwrap()[&key].held.len(), 1);
        s.flush(&key, None, "test");
        assert!(s.on_result("p0", 1, &cert, upload()).is_none(), "after it went out: dropped");
        assert!(s.on_result("p1", 1, &cert, upload()).is_some(), "another's, after the group: forwarded as it came");
        // The coordinator sends the task again (restarted, it reuses the
        // round's task ids): p0's next answer is a new one, held again.
        s.jobs.lock().unwrap().insert("he".into(), Duration::from_secs(30));
        let round_message = || {
            let rc = he_protocol::wire::RoundConfig { parties: vec!["p0".into(), "p1".into()], ..Default::default() };
            prost::Message::encode_to_vec(&rc)
        };
        let task = pb::Task {
            job_id: "he".into(),
            round: 2,
            task_id: 4,
            body: Some(pb::task::Body::Fit(pb::FitTask { round_message: round_message(), ..Default::default() })),
            bulk: None,
        };
        s.on_task("p0", &task);
        assert!(!s.flushed.lock().unwrap()[&key].1.contains("p0"), "a new attempt for p0");
        assert!(s.on_result("p0", 1, &cert, upload()).is_none(), "taken (and, p0 alone expected, sent out)");
        assert!(s.flushed.lock().unwrap()[&key].1.contains("p0"), "it went out");
        assert!(s.on_result("p0", 1, &cert, upload()).is_none(), "a second one: dropped");
    }

    /// The relay keeps the newest CA-signed revocation list the coordinator
    /// sends its parties (a forged or older one changes nothing), and
    /// checks parties and the coordinator against it.
    #[test]
    fn the_relay_keeps_the_newest_revocation_list_the_ca_signed() {
        use confide_crypto::revocation::{Revocations, certificate_serial};
        let dir = tempfile::tempdir().unwrap();
        let pki = confide_crypto::pki::PkiDir::new(dir.path());
        pki.init("t", &["a".into(), "b".into()], &[]).unwrap();
        let mut s = shared(30);
        s.ca_pem = std::fs::read(pki.ca_cert()).unwrap();
        s.config.key = dir.path().join("edge-a.key");
        let der = |p: &std::path::Path| confide_proto::net::load_certs(p).unwrap()[0].to_vec();
        let (a, b) = (der(&pki.party_cert("a")), der(&pki.party_cert("b")));
        let ca = pki.load_ca().unwrap();
        let first = ca.revoke(&Revocations::empty(), &certificate_serial(&a).unwrap()).unwrap();
        let second = ca.revoke(&first, &certificate_serial(&b).unwrap()).unwrap();
        let welcome = |crl: &[u8]| pb::CoordinatorMessage {
            body: Some(coordinator_message::Body::Welcome(pb::Welcome {
                revocations: Some(pb::RevocationList { crl: crl.to_vec() }),
                ..Default::default()
            })),
        };
        let revoked = |s: &Shared, name: &str, cert: &[u8]| s.revocations.read().unwrap().check(name, cert).is_err();
        note_down(&s, "a", &welcome(first.der()));
        assert!(revoked(&s, "a", &a) && !revoked(&s, "b", &b));
        let newer = pb::CoordinatorMessage {
            body: Some(coordinator_message::Body::Revocations(pb::RevocationList { crl: second.der().to_vec() })),
        };
        note_down(&s, "a", &newer);
        assert!(revoked(&s, "b", &b));
        // An older list, or bytes the CA did not sign, change nothing.
        note_down(&s, "a", &welcome(first.der()));
        note_down(&s, "a", &welcome(&[7; 40]));
        assert!(revoked(&s, "a", &a) && revoked(&s, "b", &b));
        // Kept beside the relay's key for its next start.
        let kept = std::fs::read(revocation_list_path(&s.config)).unwrap();
        let kept = Revocations::parse(&kept, &s.ca_pem, "kept").unwrap();
        assert_eq!(kept.der(), second.der());
    }

    fn offer(job: &str, spec: &str) -> pb::JobOffer {
        pb::JobOffer { job_id: job.into(), spec_toml: spec.into(), dataset: "d".into() }
    }

    #[test]
    fn only_he_jobs_are_summed_and_the_hold_fits_the_stage_timeout() {
        let s = shared(30);
        s.on_offer(&offer("plain", "[aggregation]\nprotocol = \"secagg\"\n"));
        s.on_offer(&offer("he", "[aggregation]\nprotocol = \"he\"\n"));
        s.on_offer(&offer("he-fast", "[aggregation]\nprotocol = \"he\"\n[timeouts]\nround_secs = 20\n"));
        s.on_offer(&offer("bad", "not toml ["));
        assert!(!s.is_he("plain") && !s.is_he("bad") && s.is_he("he"));
        // The relay's own hold under the default 300 s stage timeout; a
        // quarter of a short one, so the sum is not late.
        assert_eq!(s.hold("he"), Duration::from_secs(30));
        assert_eq!(s.hold("he-fast"), Duration::from_secs(5));
        // And of the straggler cut: a slow member does not take the
        // group's fast ones past it.
        s.on_offer(&offer(
            "he-cut",
            "[aggregation]\nprotocol = \"he\"\n[timeouts]\nround_secs = 120\nstraggler_secs = 20\n",
        ));
        assert_eq!(s.hold("he-cut"), Duration::from_secs(5));
        s.on_offer(&offer("he-cut-1", "[aggregation]\nprotocol = \"he\"\n[timeouts]\nstraggler_secs = 1\n"));
        assert_eq!(s.hold("he-cut-1"), Duration::from_millis(250));
    }
}
