//! The tokio/tonic driver: accepts parties and the admin CLI over mutual TLS,
//! routes party messages to job runners, and runs each job's [`Session`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confide_algorithms::{FeatureStats, Parameters};
use confide_crypto::pki::{PkiDir, Role};
use confide_proto::jobspec::JobSpec;
use confide_proto::pb::admin_service_server::{AdminService, AdminServiceServer};
use confide_proto::pb::party_service_server::{PartyService, PartyServiceServer};
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_proto::status::JobState;
use confide_proto::transfer::{self, Incoming};
use confide_proto::{Limits, VERSION};
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, error, info, warn};

use crate::Error;
use crate::db::{Db, unix_now};
use crate::plugins::Plugins;
use crate::session::{Input, Output, SecAggPayload, Session, Stage, StageResult, Start, TaskOut};
use crate::tls::{self, peer_of};
use confide_proto::secagg as wire;

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
}

enum Outbound {
    Msg(coordinator_message::Body),
    Params { task: pb::Task, bytes: Arc<Vec<u8>> },
    Close(Status),
}

struct PartyConn {
    conn_id: u64,
    tx: mpsc::Sender<Outbound>,
}

struct Hub {
    db: Db,
    pki: PkiDir,
    limits: Limits,
    models_dir: PathBuf,
    parties: Mutex<HashMap<String, PartyConn>>,
    jobs: Mutex<HashMap<String, mpsc::UnboundedSender<Input>>>,
    changes: watch::Sender<u64>,
    next_id: AtomicU64,
    plugins: Plugins,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    fn connected(&self) -> Vec<String> {
        lock(&self.parties).keys().cloned().collect()
    }

    /// Queues a message for a party; false if it is not connected or its queue is full.
    fn send(&self, party: &str, msg: Outbound) -> bool {
        lock(&self.parties).get(party).is_some_and(|c| c.tx.try_send(msg).is_ok())
    }

    fn route(&self, job_id: &str, input: Input) {
        match lock(&self.jobs).get(job_id) {
            Some(tx) => {
                let _ = tx.send(input);
            }
            None => debug!(job = job_id, "message for a job that is not running; ignored"),
        }
    }

    fn broadcast(&self, input: Input) {
        for tx in lock(&self.jobs).values() {
            let _ = tx.send(input.clone());
        }
    }
}

/// A running coordinator.
pub struct RunningCoordinator {
    /// The address it listens on (useful with port 0).
    pub local_addr: SocketAddr,
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

/// Starts the coordinator: opens the database, resumes unfinished jobs and
/// serves parties and the admin API until stopped.
pub async fn start(config: CoordinatorConfig) -> Result<RunningCoordinator, Error> {
    start_with(config, Plugins::default()).await
}

/// [`start`] with a build's own strategies registered.
pub async fn start_with(config: CoordinatorConfig, plugins: Plugins) -> Result<RunningCoordinator, Error> {
    config.limits.validate().map_err(|e| Error::InvalidInput(e.to_string()))?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| Error::io(&config.data_dir, e))?;
    let db = Db::open(&config.data_dir.join("confide.db"))?;
    db.reset_connections()?;
    let pki = PkiDir::new(&config.pki);
    let tls_config = tls::server_config(&pki)?;
    pki.enrolled()?;
    let hub = Arc::new(Hub {
        db,
        pki: pki.clone(),
        limits: config.limits,
        models_dir: config.data_dir.join("models"),
        parties: Mutex::new(HashMap::new()),
        jobs: Mutex::new(HashMap::new()),
        changes: watch::channel(0).0,
        next_id: AtomicU64::new(1),
        plugins,
    });
    for job in hub.db.unfinished_jobs()? {
        let spec = match JobSpec::parse(&job.spec_toml, &format!("job {}", job.id), &hub.limits) {
            Ok(s) => s,
            Err(e) => {
                hub.db.set_job_state(&job.id, JobState::Failed, Some(&format!("cannot resume: {e}")))?;
                continue;
            }
        };
        let start = match job.model {
            Some((round, path)) => {
                let model = read_model(&path)?;
                info!(job = %job.id, round, "resuming job from its checkpoint");
                Start::Resume { round, model, parties: job.parties }
            }
            None => Start::Fresh { model: initial_model(&hub, &spec)? },
        };
        spawn_job(&hub, job.id, spec, start);
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let local_addr = listener.local_addr().map_err(|e| Error::Io(e.to_string()))?;
    let incoming = ReceiverStream::new(tls::accept_loop(listener, tls_config, pki));
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
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(party_svc)
            .add_service(admin_svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown_rx.await;
            }),
    );
    info!(%local_addr, "coordinator listening (mutual TLS 1.3)");
    Ok(RunningCoordinator { local_addr, shutdown: Some(shutdown_tx), join })
}

fn read_model(path: &Path) -> Result<Parameters, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(Parameters::from_safetensors(&bytes)?)
}

/// The starting model of a job with `from_job`.
fn initial_model(hub: &Hub, spec: &JobSpec) -> Result<Option<Parameters>, Error> {
    let Some(from) = &spec.from_job else {
        return Ok(None);
    };
    match hub.db.model_of(from)? {
        Some((_, path)) => Ok(Some(read_model(&path)?)),
        None => Err(Error::InvalidInput(format!("from_job: job {from} has no model yet"))),
    }
}

fn spawn_job(hub: &Arc<Hub>, id: String, spec: JobSpec, start: Start) {
    let (tx, rx) = mpsc::unbounded_channel();
    lock(&hub.jobs).insert(id.clone(), tx);
    tokio::spawn(run_job(hub.clone(), id, spec, start, rx));
}

/// Writes a checkpoint durably: temp file, fsync, rename, fsync directory.
fn write_checkpoint(dir: &Path, job: &str, round: u32, params: &Parameters) -> Result<PathBuf, Error> {
    let job_dir = dir.join(job);
    std::fs::create_dir_all(&job_dir).map_err(|e| Error::io(&job_dir, e))?;
    let meta: BTreeMap<String, String> =
        [("confide.job".to_string(), job.to_string()), ("confide.round".to_string(), round.to_string())].into();
    let bytes = params.to_safetensors(&meta)?;
    let path = job_dir.join(format!("round-{round:05}.safetensors"));
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    if let Ok(d) = std::fs::File::open(&job_dir) {
        let _ = d.sync_all();
    }
    // Keep the previous checkpoint too; older ones are no longer referenced.
    if round >= 2 {
        let _ = std::fs::remove_file(job_dir.join(format!("round-{:05}.safetensors", round - 2)));
    }
    Ok(path)
}

async fn run_job(hub: Arc<Hub>, id: String, spec: JobSpec, start: Start, mut rx: mpsc::UnboundedReceiver<Input>) {
    let clock = Instant::now();
    let now = || clock.elapsed().as_millis() as u64;
    let strategy = match hub.plugins.build(&spec) {
        Ok(s) => s,
        Err(e) => {
            warn!(job = %id, "cannot run: {e}");
            let _ = hub.db.set_job_state(&id, JobState::Failed, Some(&format!("cannot run: {e}")));
            lock(&hub.jobs).remove(&id);
            hub.notify();
            return;
        }
    };
    let mut session = Session::with_strategy(&id, spec.clone(), strategy, start, now());
    let offer = pb::JobOffer { job_id: id.clone(), spec_toml: spec.to_toml(), dataset: String::new() };
    for p in hub.connected() {
        session.handle(now(), Input::Connected(p));
    }
    let mut encoded: Option<(u64, pb::ParamsHeader, Arc<Vec<u8>>)> = None;
    let mut marked_running = false;
    let mut round_started = Instant::now();
    // Coordinator CPU time in the round (validation, aggregation, encoding),
    // as opposed to waiting for parties.
    let mut busy = Duration::ZERO;
    let mut finished = false;
    while !finished {
        let mut feedback = Vec::new();
        while let Some(out) = session.poll_output() {
            match out {
                Output::Offer { party } => {
                    let msg = pb::JobOffer { dataset: spec.dataset_for(&party).to_owned(), ..offer.clone() };
                    if !hub.send(&party, Outbound::Msg(coordinator_message::Body::Offer(msg))) {
                        feedback.push(Input::Disconnected(party));
                    }
                }
                Output::Task { party, task } => {
                    if task.stage == Stage::Fit
                        && task.round > 0
                        && encoded.as_ref().is_none_or(|e| e.0 != task.task_id)
                    {
                        round_started = Instant::now();
                        busy = Duration::ZERO;
                    }
                    let t0 = Instant::now();
                    let msg = task_message(&id, &task, &mut encoded);
                    busy += t0.elapsed();
                    if !hub.send(&party, msg) {
                        feedback.push(Input::Disconnected(party));
                    }
                }
                Output::Checkpoint { round, params, mut record } => {
                    if let Some(r) = record.as_mut() {
                        r.completed_at = unix_now();
                        r.metrics.insert("round_ms".into(), round_started.elapsed().as_secs_f64() * 1000.0);
                        r.metrics.insert("coordinator_ms".into(), busy.as_secs_f64() * 1000.0);
                    }
                    let saved = write_checkpoint(&hub.models_dir, &id, round, &params)
                        .and_then(|path| hub.db.save_checkpoint(&id, round, &path, record.as_ref()));
                    match saved {
                        Ok(()) => {
                            if let Some(r) = &record {
                                info!(job = %id, round, metrics = ?r.metrics, dropped = ?r.dropped, "round completed");
                            }
                        }
                        Err(e) => {
                            error!(job = %id, round, "cannot save checkpoint: {e}");
                            session.handle(now(), Input::Cancel);
                            let _ = hub.db.set_job_state(
                                &id,
                                JobState::Failed,
                                Some(&format!("cannot save checkpoint: {e}")),
                            );
                            finished = true;
                        }
                    }
                }
                Output::Finished { state, error } => {
                    if let Err(e) = hub.db.set_job_state(&id, state, error.as_deref()) {
                        error!(job = %id, "cannot record the job's end: {e}");
                    }
                    match &error {
                        Some(e) => warn!(job = %id, state = state.as_str(), "job ended: {e}"),
                        None => info!(job = %id, state = state.as_str(), "job ended"),
                    }
                    let closed = pb::JobClosed {
                        job_id: id.clone(),
                        state: state.as_str().into(),
                        reason: error.clone().unwrap_or_default(),
                    };
                    for p in session.parties().keys() {
                        hub.send(p, Outbound::Msg(coordinator_message::Body::Closed(closed.clone())));
                    }
                    finished = true;
                }
            }
        }
        if session.is_running() && !marked_running {
            marked_running = true;
            let _ = hub.db.set_job_state(&id, JobState::Running, None);
        }
        if let Err(e) = hub.db.save_parties(&id, session.parties()) {
            error!(job = %id, "cannot save party statuses: {e}");
        }
        hub.notify();
        if finished {
            break;
        }
        if !feedback.is_empty() {
            let t0 = Instant::now();
            for f in feedback {
                session.handle(now(), f);
            }
            busy += t0.elapsed();
            continue;
        }
        let wait = session.next_deadline().map_or(3_600_000, |d| d.saturating_sub(now()));
        let input = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
            _ = tokio::time::sleep(Duration::from_millis(wait)) => Input::Tick,
        };
        let t0 = Instant::now();
        session.handle(now(), input);
        busy += t0.elapsed();
    }
    lock(&hub.jobs).remove(&id);
    hub.notify();
}

/// The message for one task; the parameters are encoded once per stage and
/// shared by every party's copy.
fn task_message(job: &str, task: &TaskOut, cache: &mut Option<(u64, pb::ParamsHeader, Arc<Vec<u8>>)>) -> Outbound {
    let stage = match task.stage {
        Stage::Setup => pb::Stage::Setup,
        Stage::Fit => pb::Stage::Fit,
        Stage::Evaluate => pb::Stage::Evaluate,
        Stage::SecAggShares => pb::Stage::SecaggShares,
        Stage::SecAggMasked => pb::Stage::SecaggMasked,
        Stage::SecAggUnmask => pb::Stage::SecaggUnmask,
    };
    use pb::sec_agg_message::Body;
    let secagg = task.secagg.as_ref().map(|p| pb::SecAggMessage {
        body: Some(match p {
            SecAggPayload::Round { config, clip, max_examples } => {
                Body::RoundConfig(wire::config_to_pb(config, *clip, *max_examples))
            }
            SecAggPayload::Keys(keys) => {
                Body::Keys(pb::SecAggKeys { keys: keys.iter().map(|(k, c)| wire::keys_to_pb(k, c)).collect() })
            }
            SecAggPayload::Shares(shares) => Body::Shares(wire::shares_to_pb(shares)),
            SecAggPayload::Unmask(req) => Body::Unmask(wire::unmask_to_pb(req)),
        }),
    });
    let mut msg = pb::Task {
        job_id: job.to_owned(),
        round: task.round,
        stage: stage as i32,
        task_id: task.task_id,
        config_json: task.config_json.clone(),
        params: None,
        secagg,
    };
    let Some(params) = &task.params else {
        return Outbound::Msg(coordinator_message::Body::Task(msg));
    };
    if cache.as_ref().is_none_or(|c| c.0 != task.task_id) {
        let (header, bytes) = transfer::encode(task.task_id, params);
        *cache = Some((task.task_id, header, Arc::new(bytes)));
    }
    let Some((_, header, bytes)) = cache.as_ref() else { unreachable!("cache filled above") };
    msg.params = Some(header.clone());
    Outbound::Params { task: msg, bytes: bytes.clone() }
}

struct PartySvc {
    hub: Arc<Hub>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl PartyService for PartySvc {
    type JoinStream = BoxStream<pb::CoordinatorMessage>;

    async fn join(&self, req: Request<Streaming<pb::PartyMessage>>) -> Result<Response<Self::JoinStream>, Status> {
        let id = peer_of(&req)?;
        if id.role != Role::Party {
            return Err(Status::permission_denied(format!("{} is not a party certificate", id.name)));
        }
        let hub = self.hub.clone();
        let name = id.name;
        // Relayed to peers with this party's secure-aggregation keys, so they
        // verify its signature against the CA themselves.
        let cert = req.peer_certs().and_then(|c| c.first().map(|c| c.to_vec())).unwrap_or_default();
        let inbound = req.into_inner();
        let (resp_tx, resp_rx) = mpsc::channel::<Result<pb::CoordinatorMessage, Status>>(16);
        let (out_tx, out_rx) = mpsc::channel::<Outbound>(256);
        let conn_id = hub.next_id.fetch_add(1, Ordering::Relaxed);
        let previous = lock(&hub.parties).insert(name.clone(), PartyConn { conn_id, tx: out_tx });
        if previous.is_some() {
            info!(party = %name, "party reconnected; the older stream is closed");
        }
        tokio::spawn(writer(out_rx, resp_tx, hub.limits.chunk_bytes));
        hub.send(
            &name,
            Outbound::Msg(coordinator_message::Body::Welcome(pb::Welcome {
                party: name.clone(),
                software_version: VERSION.into(),
                max_message_bytes: hub.limits.max_message_bytes as u64,
                max_values: hub.limits.max_values as u64,
            })),
        );
        if let Err(e) = hub.db.party_seen(&name, true) {
            warn!(party = %name, "cannot record connection: {e}");
        }
        info!(party = %name, "party connected");
        if previous.is_some() {
            hub.broadcast(Input::Disconnected(name.clone()));
        }
        hub.broadcast(Input::Connected(name.clone()));
        tokio::spawn(reader(hub, name, cert, conn_id, inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(resp_rx))))
    }
}

async fn writer(
    mut rx: mpsc::Receiver<Outbound>,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    chunk_bytes: usize,
) {
    let wrap = |b| Ok(pb::CoordinatorMessage { body: Some(b) });
    while let Some(out) = rx.recv().await {
        let ok = match out {
            Outbound::Msg(body) => tx.send(wrap(body)).await.is_ok(),
            Outbound::Params { task, bytes } => {
                let id = task.task_id;
                let mut ok = tx.send(wrap(coordinator_message::Body::Task(task))).await.is_ok();
                for chunk in transfer::chunks(id, &bytes, chunk_bytes) {
                    if !ok {
                        break;
                    }
                    ok = tx.send(wrap(coordinator_message::Body::Chunk(chunk))).await.is_ok();
                }
                ok
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

struct PendingResult {
    result: pb::TaskResult,
    incoming: Incoming,
}

async fn reader(hub: Arc<Hub>, name: String, cert: Vec<u8>, conn_id: u64, mut inbound: Streaming<pb::PartyMessage>) {
    let mut pending: Option<PendingResult> = None;
    loop {
        match inbound.message().await {
            Ok(Some(msg)) => {
                if let Err(reason) = on_party_message(&hub, &name, &cert, msg, &mut pending) {
                    warn!(party = %name, "closing the stream: {reason}");
                    if let Some(p) = pending.take() {
                        hub.route(
                            &p.result.job_id,
                            Input::TaskFailed {
                                party: name.clone(),
                                task_id: p.result.task_id,
                                reason: reason.clone(),
                            },
                        );
                    }
                    hub.send(&name, Outbound::Close(Status::invalid_argument(reason)));
                    break;
                }
            }
            Ok(None) => {
                info!(party = %name, "party closed its stream");
                break;
            }
            Err(status) => {
                warn!(party = %name, "party stream failed: {}", status.message());
                break;
            }
        }
    }
    let current = {
        let mut parties = lock(&hub.parties);
        if parties.get(&name).is_some_and(|c| c.conn_id == conn_id) {
            parties.remove(&name);
            true
        } else {
            false
        }
    };
    if current {
        let _ = hub.db.party_seen(&name, false);
        hub.broadcast(Input::Disconnected(name.clone()));
        info!(party = %name, "party disconnected");
    }
}

const MAX_METRICS: usize = 64;

/// Handles one message; an `Err` is a protocol violation that closes the stream.
fn on_party_message(
    hub: &Hub,
    name: &str,
    cert: &[u8],
    msg: pb::PartyMessage,
    pending: &mut Option<PendingResult>,
) -> Result<(), String> {
    match msg.body {
        None => Err("empty message".into()),
        Some(party_message::Body::Hello(h)) => {
            debug!(party = name, version = %h.software_version, "hello");
            Ok(())
        }
        Some(party_message::Body::JobAnswer(a)) => {
            if a.accepted {
                info!(party = name, job = %a.job_id, "party accepted the job");
            } else {
                warn!(party = name, job = %a.job_id, "party refused the job: {}", a.reason);
            }
            let reason: String = a.reason.chars().take(1000).collect();
            hub.route(&a.job_id, Input::Answer { party: name.to_owned(), accepted: a.accepted, reason });
            Ok(())
        }
        Some(party_message::Body::Failed(f)) => {
            let reason: String = f.reason.chars().take(1000).collect();
            warn!(party = name, job = %f.job_id, "party could not do task {}: {reason}", f.task_id);
            hub.route(&f.job_id, Input::TaskFailed { party: name.to_owned(), task_id: f.task_id, reason });
            Ok(())
        }
        Some(party_message::Body::Result(r)) => {
            if pending.is_some() {
                return Err("a new result started before the previous one's chunks ended".into());
            }
            if r.metrics.len() > MAX_METRICS || r.metrics.keys().any(|k| k.is_empty() || k.len() > 64) {
                return Err(format!("at most {MAX_METRICS} metrics with names of 1 to 64 bytes"));
            }
            match &r.params {
                None => deliver(hub, name, cert, r, None),
                Some(header) => {
                    let incoming = Incoming::start(header, &hub.limits).map_err(|e| e.to_string())?;
                    if incoming.is_complete() {
                        let payload = finish_transfer(&r, incoming)?;
                        deliver(hub, name, cert, r, Some(payload))
                    } else {
                        *pending = Some(PendingResult { result: r, incoming });
                        Ok(())
                    }
                }
            }
        }
        Some(party_message::Body::Chunk(c)) => {
            let p = pending.as_mut().ok_or("chunk without an announced transfer")?;
            p.incoming.push(&c).map_err(|e| e.to_string())?;
            if p.incoming.is_complete() {
                let Some(p) = pending.take() else {
                    return Ok(());
                };
                let payload = finish_transfer(&p.result, p.incoming)?;
                deliver(hub, name, cert, p.result, Some(payload))
            } else {
                Ok(())
            }
        }
    }
}

/// Turns a complete result into a session input; a result that does not fit
/// its stage fails the task (the party is dropped from the round, named).
/// What a result's chunked transfer carried.
enum Payload {
    Params(Parameters),
    /// A masked vector in Z_{2^b}.
    Words(Vec<u32>),
}

fn finish_transfer(r: &pb::TaskResult, incoming: Incoming) -> Result<Payload, String> {
    if r.stage == pb::Stage::SecaggMasked as i32 {
        incoming.finish_words().map(Payload::Words).map_err(|e| e.to_string())
    } else {
        incoming.finish().map(Payload::Params).map_err(|e| e.to_string())
    }
}

fn deliver(hub: &Hub, name: &str, cert: &[u8], r: pb::TaskResult, payload: Option<Payload>) -> Result<(), String> {
    let metrics: BTreeMap<String, f64> = r.metrics.clone().into_iter().collect();
    let stage = pb::Stage::try_from(r.stage).unwrap_or(pb::Stage::Unspecified);
    use pb::sec_agg_message::Body;
    let secagg = r.secagg.as_ref().and_then(|m| m.body.as_ref());
    let max = hub.limits.max_parties;
    let (params, words) = match payload {
        Some(Payload::Params(p)) => (Some(p), None),
        Some(Payload::Words(w)) => (None, Some(w)),
        None => (None, None),
    };
    let secure = match (stage, secagg, words) {
        (pb::Stage::Fit, Some(Body::Advert(k)), None) if params.is_none() => Some(
            wire::keys_from_pb(k)
                .map(|(advert, _)| StageResult::SecAggKeys {
                    advert,
                    certificate: cert.to_vec(),
                    metrics: metrics.clone(),
                })
                .map_err(|e| e.to_string()),
        ),
        (pb::Stage::SecaggShares, Some(Body::Shares(s)), None) => {
            Some(wire::shares_from_pb(s, max).map(StageResult::SecAggShares).map_err(|e| e.to_string()))
        }
        (pb::Stage::SecaggMasked, None, Some(w)) => Some(Ok(StageResult::SecAggMasked(w))),
        (pb::Stage::SecaggUnmask, Some(Body::UnmaskShares(u)), None) => {
            Some(wire::unmask_shares_from_pb(name, u, max).map(StageResult::SecAggUnmask).map_err(|e| e.to_string()))
        }
        (_, Some(_), _) | (_, _, Some(_)) => Some(Err(format!("unexpected secure-aggregation payload for {stage:?}"))),
        _ => None,
    };
    let result = match (secure, stage, params) {
        (Some(r), _, _) => r,
        (None, pb::Stage::Setup, Some(params)) => {
            let d = r.feature_sum.len();
            if r.feature_sum_sq.len() != d || d > hub.limits.max_values {
                Err(format!("feature sums of {} and {} features", d, r.feature_sum_sq.len()))
            } else {
                let stats = FeatureStats { count: r.num_examples, sum: r.feature_sum, sum_sq: r.feature_sum_sq };
                Ok(StageResult::Setup { params, stats })
            }
        }
        (None, pb::Stage::Fit, Some(params)) => Ok(StageResult::Fit { num_examples: r.num_examples, params, metrics }),
        (None, pb::Stage::Evaluate, None) => {
            Ok(StageResult::Evaluate { num_examples: r.num_examples, loss: r.loss, metrics })
        }
        (None, s, p) => Err(format!("a {s:?} result {} parameters", if p.is_some() { "with" } else { "without" })),
    };
    let input = match result {
        Ok(result) => {
            debug!(party = name, job = %r.job_id, round = r.round, ?stage, "result received");
            Input::Result { party: name.to_owned(), task_id: r.task_id, result }
        }
        Err(reason) => {
            warn!(party = name, job = %r.job_id, "malformed result: {reason}");
            Input::TaskFailed {
                party: name.to_owned(),
                task_id: r.task_id,
                reason: format!("malformed result: {reason}"),
            }
        }
    };
    hub.route(&r.job_id, input);
    Ok(())
}

struct AdminSvc {
    hub: Arc<Hub>,
}

fn require_admin<T>(req: &Request<T>) -> Result<(), Status> {
    let id = peer_of(req)?;
    if id.role == Role::Admin {
        Ok(())
    } else {
        Err(Status::permission_denied(format!("{} may not use the admin API", id.name)))
    }
}

fn status_json(hub: &Hub, id: &str, history: bool) -> Result<pb::JobStatusReply, Status> {
    let st = hub.db.job_status(id, history)?;
    let json = serde_json::to_string(&st).map_err(|e| Status::internal(e.to_string()))?;
    Ok(pb::JobStatusReply { status_json: json })
}

fn new_job_id() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("j{ms:x}-{:04x}", rand::random::<u16>())
}

#[tonic::async_trait]
impl AdminService for AdminSvc {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobReply>, Status> {
        require_admin(&req)?;
        let r = req.into_inner();
        let file = if r.file_name.is_empty() { "(submitted spec)".to_owned() } else { r.file_name };
        let spec = JobSpec::parse(&r.spec_toml, &file, &self.hub.limits).map_err(Error::from)?;
        let enrolled = self.hub.pki.enrolled().map_err(Error::from)?;
        let unknown: Vec<String> = spec
            .parties
            .names
            .iter()
            .enumerate()
            .filter(|(_, n)| !enrolled.contains(n))
            .map(|(i, n)| format!("\n  {file}: parties.names[{i}]: {n:?} is not enrolled in this federation"))
            .collect();
        if !unknown.is_empty() {
            return Err(Status::invalid_argument(format!("{file}: invalid job spec{}", unknown.concat())));
        }
        if let Err(e) = self.hub.plugins.build(&spec) {
            return Err(Status::invalid_argument(format!("{file}: invalid job spec\n  {file}: {e}")));
        }
        let model = initial_model(&self.hub, &spec).map_err(|e| match e {
            Error::NotFound(m) => Status::invalid_argument(format!("{file}: from_job: {m}")),
            e => Status::from(e),
        })?;
        let id = new_job_id();
        self.hub.db.insert_job(&id, &spec)?;
        info!(job = %id, name = %spec.name, "job submitted");
        spawn_job(&self.hub, id.clone(), spec, Start::Fresh { model });
        self.hub.notify();
        Ok(Response::new(pb::SubmitJobReply { job_id: id }))
    }

    async fn list_jobs(&self, req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsReply>, Status> {
        require_admin(&req)?;
        let jobs = self.hub.db.list_jobs()?;
        let jobs_json = jobs.iter().filter_map(|j| serde_json::to_string(j).ok()).collect();
        Ok(Response::new(pb::ListJobsReply { jobs_json }))
    }

    async fn get_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobStatusReply>, Status> {
        require_admin(&req)?;
        Ok(Response::new(status_json(&self.hub, &req.into_inner().job_id, true)?))
    }

    type WatchJobStream = BoxStream<pb::JobStatusReply>;

    async fn watch_job(&self, req: Request<pb::JobRef>) -> Result<Response<Self::WatchJobStream>, Status> {
        require_admin(&req)?;
        let id = req.into_inner().job_id;
        let first = status_json(&self.hub, &id, true)?;
        let hub = self.hub.clone();
        let mut changes = hub.changes.subscribe();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut last = first.status_json.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let running = lock(&hub.jobs).contains_key(&id);
                if !running {
                    // One final status after the runner has ended.
                    if let Ok(s) = status_json(&hub, &id, true)
                        && s.status_json != last
                    {
                        let _ = tx.send(Ok(s)).await;
                    }
                    return;
                }
                if changes.changed().await.is_err() {
                    return;
                }
                match status_json(&hub, &id, true) {
                    Ok(s) if s.status_json != last => {
                        last = s.status_json.clone();
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
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<pb::JobRef>) -> Result<Response<pb::JobStatusReply>, Status> {
        require_admin(&req)?;
        let id = req.into_inner().job_id;
        let st = self.hub.db.job_status(&id, false)?;
        if st.state.is_terminal() {
            return Err(Status::failed_precondition(format!("job {id} has already ended ({})", st.state.as_str())));
        }
        self.hub.route(&id, Input::Cancel);
        // Wait briefly for the runner to record the cancellation.
        let mut changes = self.hub.changes.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lock(&self.hub.jobs).contains_key(&id) {
            if tokio::time::timeout_at(deadline, changes.changed()).await.is_err() {
                break;
            }
        }
        Ok(Response::new(status_json(&self.hub, &id, true)?))
    }

    type GetModelStream = BoxStream<pb::ModelChunk>;

    async fn get_model(&self, req: Request<pb::JobRef>) -> Result<Response<Self::GetModelStream>, Status> {
        require_admin(&req)?;
        let id = req.into_inner().job_id;
        let (round, path) = self
            .hub
            .db
            .model_of(&id)?
            .ok_or_else(|| Status::failed_precondition(format!("job {id} has no model yet")))?;
        let bytes = std::fs::read(&path).map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
        let chunk = self.hub.limits.chunk_bytes;
        let total = bytes.len() as u64;
        let msgs: Vec<Result<pb::ModelChunk, Status>> =
            bytes.chunks(chunk).map(|c| Ok(pb::ModelChunk { total_bytes: total, round, data: c.to_vec() })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }
}
