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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confide_crypto::aggregation::he::{self as he_protocol, relay::UploadGroup};
use confide_crypto::aggregation::{AggregationProtocol, Envelope};
use confide_proto::Limits;
use confide_proto::messages::{ResultBody, TaskResult};
use confide_proto::net::{ClientIdentity, connect_checking_revocations};
use confide_proto::pb::party_service_client::PartyServiceClient;
use confide_proto::pb::party_service_server::{PartyService, PartyServiceServer};
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_proto::transfer::{self, Incoming};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::Error;
use crate::server::{RELAYED_CERT, RELAYED_SIGNATURE, RELAYED_TIME};
use crate::tls::{self, Admission, peer_of};

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
    let incoming = ReceiverStream::new(tls::accept_loop_with(listener, tls_config, Admission::Relay));
    let max = config.limits.max_message_bytes;
    let shared = Arc::new(Shared {
        name: id.name.clone(),
        config,
        jobs: Mutex::default(),
        pending: Mutex::default(),
        members: Mutex::default(),
        rounds: Mutex::default(),
        next_transfer: AtomicU64::new(1 << 62),
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
    /// Jobs whose uploads the relay sums (their protocol is `he`).
    jobs: Mutex<HashMap<String, bool>>,
    /// Upload tasks in progress, by (job, task id).
    pending: Mutex<HashMap<(String, u64), Pending>>,
    /// The upstream of each connected party.
    members: Mutex<HashMap<String, Member>>,
    /// The `he` keygen rounds in progress, by (job, round): their round
    /// message and the parties asked to deal (the answers to the
    /// key-confirm step are the round's uploads).
    rounds: Mutex<HashMap<(String, u32), KeygenRound>>,
    next_transfer: AtomicU64,
}

#[derive(Clone)]
struct Member {
    conn: u64,
    up: Upstream,
}

/// One task whose answers are ciphertext uploads.
struct Pending {
    round_message: Vec<u8>,
    /// Parties given the task that may still answer.
    expected: BTreeSet<String>,
    group: Option<UploadGroup>,
    /// Each member's result, its contribution taken out.
    results: HashMap<String, TaskResult>,
    timer: bool,
}

/// A keygen round's message and the relay's parties asked to deal in it.
type KeygenRound = (Vec<u8>, BTreeSet<String>);

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Shared {
    fn is_he(&self, job: &str) -> bool {
        lock(&self.jobs).get(job).copied().unwrap_or(false)
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
                    lock(&self.rounds).insert(round, (round_message.clone(), BTreeSet::new()));
                    return;
                }
                (round_message.clone(), rc.parties.into_iter().collect())
            }
            Some(Body::Aggregation(s)) if s.stage == he_protocol::KEY_DEAL.as_str() => {
                if let Some((_, dealers)) = lock(&self.rounds).get_mut(&round) {
                    dealers.insert(party.to_owned());
                }
                return;
            }
            Some(Body::Aggregation(s)) if s.stage == he_protocol::KEY_CONFIRM.as_str() => {
                match lock(&self.rounds).get(&round).cloned() {
                    Some(r) => r,
                    None => {
                        debug!(job = %task.job_id, "key confirmation of a round this relay did not see start");
                        return;
                    }
                }
            }
            _ => return,
        };
        let connected: BTreeSet<String> = lock(&self.members).keys().cloned().collect();
        let mut p = lock(&self.pending);
        let entry = p.entry((task.job_id.clone(), task.task_id)).or_insert_with(|| {
            let mut fresh = Pending::new(&round_message);
            fresh.expected = connected.intersection(&among).cloned().collect();
            fresh
        });
        entry.expected.insert(party.to_owned());
    }

    /// A result from `party`: an upload it holds, or `Some` to forward.
    fn on_result(self: &Arc<Self>, party: &str, certificate: &[u8], result: TaskResult) -> Option<TaskResult> {
        let key = (result.job_id.clone(), result.task_id);
        let mut pending = lock(&self.pending);
        let Some(p) = pending.get_mut(&key) else { return Some(result) };
        if !p.expected.contains(party) {
            return Some(result);
        }
        let (mut result, contribution) = take_contribution(result);
        let Some(contribution) = contribution else { return Some(result) };
        let group = match p.group.take() {
            Some(g) => Ok(g),
            None => UploadGroup::new(&self.name, &p.round_message),
        };
        let mut group = match group {
            Ok(g) => g,
            Err(e) => {
                warn!(party, "cannot group this upload: {e}");
                put_contribution(&mut result, contribution);
                return Some(result);
            }
        };
        match group.add(party, certificate, contribution.clone()) {
            Ok(()) => {
                p.group = Some(group);
                p.results.insert(party.to_owned(), result);
            }
            Err(e) => {
                // Forwarded as it came, for the coordinator to judge.
                warn!(party, "an upload the relay cannot add: {e}");
                p.group = Some(group);
                p.expected.remove(party);
                put_contribution(&mut result, contribution);
                drop(pending);
                self.maybe_flush(&key);
                return Some(result);
            }
        }
        let start_timer = !p.timer;
        p.timer = true;
        drop(pending);
        if start_timer {
            let (shared, key2) = (self.clone(), key.clone());
            tokio::spawn(async move {
                tokio::time::sleep(shared.config.hold).await;
                shared.flush(&key2, "hold time over");
            });
        }
        self.maybe_flush(&key);
        None
    }

    /// `party` will not answer task `key` (it failed it or disconnected).
    fn gone(&self, party: &str, key: Option<&(String, u64)>) {
        let keys: Vec<(String, u64)> = {
            let mut pending = lock(&self.pending);
            pending
                .iter_mut()
                .filter(|(k, p)| key.is_none_or(|x| x == *k) && !p.results.contains_key(party))
                .filter_map(|(k, p)| p.expected.remove(party).then(|| k.clone()))
                .collect()
        };
        for k in keys {
            self.maybe_flush(&k);
        }
    }

    fn maybe_flush(&self, key: &(String, u64)) {
        let complete = lock(&self.pending)
            .get(key)
            .is_some_and(|p| !p.results.is_empty() && p.expected.iter().all(|m| p.results.contains_key(m)));
        if complete {
            self.flush(key, "every member answered");
        }
    }

    /// Sums what came for task `key` and forwards it.
    fn flush(&self, key: &(String, u64), why: &str) {
        let Some(mut p) = lock(&self.pending).remove(key) else { return };
        let Some(group) = p.group.take() else { return };
        let members = group.len();
        let upstreams = lock(&self.members).clone();
        // The sum travels on the stream of a member still connected.
        let leader = p.results.keys().find(|m| upstreams.contains_key(*m)).cloned();
        let out = group.finish_led_by(leader.as_deref());
        info!(job = %key.0, task = key.1, members, "forwarding a group sum ({why})");
        for (party, envelope) in out {
            let Some(mut result) = p.results.remove(&party) else { continue };
            put_contribution(&mut result, envelope);
            let Some(member) = upstreams.get(&party) else {
                warn!(party = %party, "left before its group was forwarded");
                continue;
            };
            let (up, limits, id) =
                (member.up.clone(), self.config.limits, self.next_transfer.fetch_add(1, Ordering::Relaxed));
            tokio::spawn(async move { send_result(&up, result, id, limits.chunk_bytes).await });
        }
    }
}

impl Pending {
    fn new(round_message: &[u8]) -> Pending {
        Pending {
            round_message: round_message.to_vec(),
            expected: BTreeSet::new(),
            group: None,
            results: HashMap::new(),
            timer: false,
        }
    }
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

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl PartyService for RelaySvc {
    type JoinStream = BoxStream<pb::CoordinatorMessage>;

    async fn join(&self, req: Request<Streaming<pb::PartyMessage>>) -> Result<Response<Self::JoinStream>, Status> {
        let id = peer_of(&req)?;
        let party = id.name;
        let certificate: Arc<[u8]> = req
            .peer_certs()
            .and_then(|c| c.first().map(|c| Arc::from(c.as_ref())))
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
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
        let shared = self.shared.clone();
        let cfg = &shared.config;
        let client_id = ClientIdentity {
            url: &cfg.coordinator,
            server_name: &cfg.server_name,
            ca: &cfg.ca,
            cert: &cfg.cert,
            key: &cfg.key,
        };
        let (channel, _) = connect_checking_revocations(&client_id, None)
            .await
            .map_err(|e| Status::unavailable(format!("relay {}: {e}", shared.name)))?;
        let max = cfg.limits.max_message_bytes;
        let mut client = PartyServiceClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max);
        let (up_tx, up_rx) = mpsc::channel::<pb::PartyMessage>(32);
        let _ = up_tx.send(pb::PartyMessage { body: Some(party_message::Body::Hello(hello.clone())) }).await;
        let mut request = Request::new(ReceiverStream::new(up_rx));
        let meta = request.metadata_mut();
        meta.insert_bin(RELAYED_CERT, tonic::metadata::MetadataValue::from_bytes(&certificate));
        meta.insert_bin(RELAYED_SIGNATURE, tonic::metadata::MetadataValue::from_bytes(&hello.relay_delegation));
        meta.insert(
            RELAYED_TIME,
            hello.delegation_time.to_string().parse().map_err(|_| Status::internal("delegation time"))?,
        );
        let upstream = client.join(request).await?.into_inner();
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let up: Upstream = Arc::new(tokio::sync::Mutex::new(up_tx));
        lock(&shared.members).insert(party.clone(), Member { conn, up: up.clone() });
        info!(party = %party, "party connected; its stream goes to the coordinator");
        let (down_tx, down_rx) = mpsc::channel::<Result<pb::CoordinatorMessage, Status>>(32);
        tokio::spawn(pump_down(shared.clone(), party.clone(), upstream, down_tx));
        tokio::spawn(pump_up(shared, party, conn, certificate, inbound, up));
        Ok(Response::new(Box::pin(ReceiverStream::new(down_rx))))
    }
}

/// Coordinator → party, as it comes; tasks are noted on the way.
async fn pump_down(
    shared: Arc<Shared>,
    party: String,
    mut upstream: Streaming<pb::CoordinatorMessage>,
    down: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
) {
    loop {
        match upstream.message().await {
            Ok(Some(msg)) => {
                match &msg.body {
                    Some(coordinator_message::Body::Offer(o)) => {
                        let he = toml::from_str::<toml::Table>(&o.spec_toml).ok().is_some_and(|t| {
                            t.get("aggregation").and_then(|a| a.get("protocol")).and_then(|p| p.as_str())
                                == Some(he_protocol::ThresholdHe.name())
                        });
                        lock(&shared.jobs).insert(o.job_id.clone(), he);
                    }
                    Some(coordinator_message::Body::Task(t)) => shared.on_task(&party, t),
                    Some(coordinator_message::Body::Closed(c)) => {
                        lock(&shared.jobs).remove(&c.job_id);
                        lock(&shared.pending).retain(|k, _| k.0 != c.job_id);
                        lock(&shared.rounds).retain(|k, _| k.0 != c.job_id);
                    }
                    _ => {}
                }
                if down.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            Ok(None) => break,
            Err(status) => {
                warn!(party = %party, "coordinator stream failed: {}", status.message());
                let _ = down.send(Err(status)).await;
                break;
            }
        }
    }
    info!(party = %party, "the coordinator closed the party's stream");
}

/// Party → coordinator: whole results (reassembled), uploads of `he` jobs
/// held for their group.
async fn pump_up(
    shared: Arc<Shared>,
    party: String,
    conn: u64,
    certificate: Arc<[u8]>,
    mut inbound: Streaming<pb::PartyMessage>,
    up: Upstream,
) {
    let mut pending: Option<(pb::TaskResult, Incoming)> = None;
    let limits = shared.config.limits;
    let why = loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break "closed its stream".to_owned(),
            Err(s) => break format!("stream failed: {}", s.message()),
        };
        let complete = match msg.body {
            Some(party_message::Body::Result(mut r)) => {
                if pending.is_some() {
                    break "a new result started before the previous one's chunks ended".into();
                }
                match r.bulk.take() {
                    None => Some((r, None)),
                    Some(h) => match Incoming::start(&h, &limits) {
                        Ok(inc) if inc.is_complete() => match inc.finish() {
                            Ok(b) => Some((r, Some(b))),
                            Err(e) => break e.to_string(),
                        },
                        Ok(inc) => {
                            pending = Some((r, inc));
                            None
                        }
                        Err(e) => break e.to_string(),
                    },
                }
            }
            Some(party_message::Body::Chunk(c)) => {
                let Some((_, inc)) = pending.as_mut() else { break "a chunk without a transfer".into() };
                if let Err(e) = inc.push(&c) {
                    break e.to_string();
                }
                if inc.is_complete() {
                    let Some((r, inc)) = pending.take() else { break "lost transfer".into() };
                    match inc.finish() {
                        Ok(b) => Some((r, Some(b))),
                        Err(e) => break e.to_string(),
                    }
                } else {
                    None
                }
            }
            Some(party_message::Body::Failed(f)) => {
                shared.gone(&party, Some(&(f.job_id.clone(), f.task_id)));
                let tx = up.lock().await;
                if tx.send(pb::PartyMessage { body: Some(party_message::Body::Failed(f)) }).await.is_err() {
                    break "the coordinator's stream ended".into();
                }
                None
            }
            other => {
                let tx = up.lock().await;
                if tx.send(pb::PartyMessage { body: other }).await.is_err() {
                    break "the coordinator's stream ended".into();
                }
                None
            }
        };
        let Some((r, bulk)) = complete else { continue };
        let result = match TaskResult::try_from((r, bulk)) {
            Ok(r) => r,
            Err(e) => break format!("malformed result: {e}"),
        };
        if let Some(forward) = shared.on_result(&party, &certificate, result) {
            let id = shared.next_transfer.fetch_add(1, Ordering::Relaxed);
            send_result(&up, forward, id, limits.chunk_bytes).await;
        }
    };
    info!(party = %party, "party left: {why}");
    {
        let mut members = lock(&shared.members);
        if members.get(&party).is_some_and(|m| m.conn == conn) {
            members.remove(&party);
        }
    }
    shared.gone(&party, None);
}
