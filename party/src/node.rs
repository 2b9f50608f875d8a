//! The party's connection loop and per-job worker threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use confide_algorithms::{FitConfig, Parameters, Trainer};
use confide_crypto::identity::{CertVerifier, IdentityKey};
use confide_crypto::secagg::encoding::FixedPoint;
use confide_crypto::secagg::protocol::{Client as SecAggClient, IdentityVerifier};
use confide_proto::VERSION;
use confide_proto::jobspec::JobSpec;
use confide_proto::jobspec::PrivacyMode;
use confide_proto::net::{ClientIdentity, connect};
use confide_proto::pb::party_service_client::PartyServiceClient;
use confide_proto::pb::{self, coordinator_message, party_message};
use confide_proto::secagg as wire;
use confide_proto::transfer::{self, Incoming};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::Error;
use crate::config::PartyConfig;
use crate::trainers::TrainerFactory;

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
    factory: Arc<dyn TrainerFactory>,
    stats: Arc<NodeStats>,
}

enum Command {
    Task { task: pb::Task, params: Option<Parameters> },
}

struct Outbox {
    tx: mpsc::Sender<pb::PartyMessage>,
    stats: Arc<NodeStats>,
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

impl PartyNode {
    /// A node with the given trainer factory.
    pub fn new(config: PartyConfig, factory: Arc<dyn TrainerFactory>) -> PartyNode {
        PartyNode { config, factory, stats: Arc::new(NodeStats::default()) }
    }

    /// Its traffic counters.
    pub fn stats(&self) -> Arc<NodeStats> {
        self.stats.clone()
    }

    /// Connects, serves, and reconnects with exponential back-off forever.
    pub async fn run(&self) {
        let (initial, max) = (self.config.reconnect.initial_ms, self.config.reconnect.max_ms);
        let mut delay = initial;
        loop {
            match self.serve_once().await {
                Ok(true) => {
                    info!("the coordinator closed the stream; reconnecting");
                    delay = initial;
                }
                Ok(false) => warn!("the coordinator closed the stream before welcoming us"),
                Err(e) => warn!("{e}; retrying in {delay} ms"),
            }
            // Jitter spreads reconnects after a coordinator restart.
            let jitter = rand::random::<u64>() % (delay / 4 + 1);
            tokio::time::sleep(Duration::from_millis(delay + jitter)).await;
            delay = (delay * 2).min(max);
        }
    }

    /// One connection: returns whether the coordinator welcomed us.
    async fn serve_once(&self) -> Result<bool, Error> {
        let cfg = &self.config;
        let id = ClientIdentity {
            url: &cfg.coordinator,
            server_name: &cfg.server_name,
            ca: &cfg.ca,
            cert: &cfg.cert,
            key: &cfg.key,
        };
        let channel = connect(&id).await.map_err(|e| Error::Transport(e.to_string()))?;
        let max = cfg.limits.max_message_bytes;
        let mut client = PartyServiceClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max);
        let (tx, rx) = mpsc::channel::<pb::PartyMessage>(32);
        let outbox = Arc::new(Outbox { tx, stats: self.stats.clone() });
        outbox.send(party_message::Body::Hello(pb::Hello { software_version: VERSION.into() })).await;
        let mut inbound = client
            .join(ReceiverStream::new(rx))
            .await
            .map_err(|s| Error::Transport(format!("coordinator refused the stream: {}", s.message())))?
            .into_inner();
        let mut welcomed = false;
        let mut me = String::new();
        let mut jobs: HashMap<String, std::sync::mpsc::Sender<Command>> = HashMap::new();
        let mut pending: Option<(pb::Task, Incoming)> = None;
        loop {
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(welcomed),
                Err(s) => return Err(Error::Transport(format!("stream ended: {}", s.message()))),
            };
            self.stats.bytes_received.fetch_add(msg.encoded_len() as u64, Ordering::Relaxed);
            let Some(body) = msg.body else {
                return Err(Error::PeerMisbehaved("empty message".into()));
            };
            match body {
                coordinator_message::Body::Welcome(w) => {
                    info!(party = %w.party, coordinator_version = %w.software_version, "connected to the coordinator");
                    me = w.party;
                    welcomed = true;
                }
                coordinator_message::Body::Offer(offer) => {
                    let job_id = offer.job_id.clone();
                    let answer = match self.consider(&offer, &me).await {
                        Ok((trainer, secagg)) => {
                            let worker = spawn_worker(
                                job_id.clone(),
                                trainer,
                                secagg,
                                outbox.clone(),
                                cfg.limits.chunk_bytes,
                                self.stats.clone(),
                            );
                            jobs.insert(job_id.clone(), worker);
                            info!(job = %job_id, dataset = %offer.dataset, "accepted job");
                            pb::JobAnswer { job_id, accepted: true, reason: String::new() }
                        }
                        Err(reason) => {
                            warn!(job = %job_id, "refused job: {reason}");
                            pb::JobAnswer { job_id, accepted: false, reason }
                        }
                    };
                    outbox.send(party_message::Body::JobAnswer(answer)).await;
                }
                coordinator_message::Body::Task(task) => {
                    if let Some(stage) = &cfg.fault.exit_on_stage
                        && stage_name(task.stage) == stage
                    {
                        warn!(job = %task.job_id, round = task.round, "fault injection: exiting on a {stage} task");
                        std::process::exit(3);
                    }
                    if pending.is_some() {
                        return Err(Error::PeerMisbehaved(
                            "a task started before the previous one's chunks ended".into(),
                        ));
                    }
                    match &task.params {
                        None => dispatch(&jobs, &outbox, task, None).await,
                        Some(h) => {
                            let inc =
                                Incoming::start(h, &cfg.limits).map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                            if inc.is_complete() {
                                let p = inc.finish().map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                                dispatch(&jobs, &outbox, task, Some(p)).await;
                            } else {
                                pending = Some((task, inc));
                            }
                        }
                    }
                }
                coordinator_message::Body::Chunk(c) => {
                    let (_, inc) =
                        pending.as_mut().ok_or_else(|| Error::PeerMisbehaved("chunk without a task".into()))?;
                    inc.push(&c).map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                    if inc.is_complete()
                        && let Some((task, inc)) = pending.take()
                    {
                        let p = inc.finish().map_err(|e| Error::PeerMisbehaved(e.to_string()))?;
                        dispatch(&jobs, &outbox, task, Some(p)).await;
                    }
                }
                coordinator_message::Body::Closed(c) => {
                    jobs.remove(&c.job_id);
                    if c.reason.is_empty() {
                        info!(job = %c.job_id, state = %c.state, "job closed");
                    } else {
                        info!(job = %c.job_id, state = %c.state, "job closed: {}", c.reason);
                    }
                }
            }
        }
    }

    /// Applies the local policy to an offer and builds the trainer; the
    /// error is the refusal reason sent to the coordinator.
    async fn consider(&self, offer: &pb::JobOffer, me: &str) -> Result<(Box<dyn Trainer>, Option<SecAggCtx>), String> {
        let cfg = &self.config;
        let spec = JobSpec::parse(&offer.spec_toml, &format!("offer of job {}", offer.job_id), &cfg.limits)
            .map_err(|e| format!("invalid job spec: {e}"))?;
        let kind = spec.kind.as_str();
        if !cfg.policy.job_kinds.iter().any(|k| k == kind) {
            return Err(format!("policy forbids job kind {kind:?} (accepted: {})", cfg.policy.job_kinds.join(", ")));
        }
        let mode = spec.privacy.mode.as_str();
        if !cfg.policy.privacy_modes.iter().any(|m| m == mode) {
            return Err(format!(
                "policy forbids privacy mode {mode:?} (accepted: {})",
                cfg.policy.privacy_modes.join(", ")
            ));
        }
        if spec.min_parties() < cfg.policy.min_parties {
            return Err(format!(
                "policy requires jobs with at least {} parties; this one needs only {}",
                cfg.policy.min_parties,
                spec.min_parties()
            ));
        }
        let source = cfg
            .datasets
            .get(&offer.dataset)
            .cloned()
            .ok_or_else(|| format!("no data set named {:?} at this party", offer.dataset))?;
        let secagg = match spec.privacy.mode {
            PrivacyMode::Secagg => {
                let key = std::fs::read(&cfg.key).map_err(|e| format!("{}: {e}", cfg.key.display()))?;
                let key = IdentityKey::from_pem(&key).map_err(|e| format!("{}: {e}", cfg.key.display()))?;
                let ca_pem = std::fs::read(&cfg.ca).map_err(|e| format!("{}: {e}", cfg.ca.display()))?;
                let verifier = CertVerifier::new(&ca_pem).map_err(|e| format!("{}: {e}", cfg.ca.display()))?;
                Some(SecAggCtx {
                    me: me.to_owned(),
                    key: Arc::new(key),
                    verifier,
                    max_values: cfg.limits.max_values,
                    round: None,
                })
            }
            PrivacyMode::None => None,
        };
        let factory = self.factory.clone();
        let me = me.to_owned();
        let trainer = tokio::task::spawn_blocking(move || factory.build(&spec, &source, &me))
            .await
            .map_err(|e| format!("trainer set-up panicked: {e}"))?
            .map_err(|e| format!("data set {:?}: {e}", offer.dataset))?;
        Ok((trainer, secagg))
    }
}

async fn dispatch(
    jobs: &HashMap<String, std::sync::mpsc::Sender<Command>>,
    outbox: &Outbox,
    task: pb::Task,
    params: Option<Parameters>,
) {
    let (job_id, task_id) = (task.job_id.clone(), task.task_id);
    let sent = jobs.get(&job_id).is_some_and(|w| w.send(Command::Task { task, params }).is_ok());
    if !sent {
        let reason = "this party has not accepted the job".to_string();
        outbox.send(party_message::Body::Failed(pb::TaskFailed { job_id, task_id, reason })).await;
    }
}

/// A party's secure-aggregation context for one job.
struct SecAggCtx {
    me: String,
    key: Arc<IdentityKey>,
    /// Peers' certificates checked against the federation CA, kept for the
    /// job so that later rounds only verify the round keys' signatures.
    verifier: CertVerifier,
    max_values: usize,
    /// The round in progress: the client and its encoded input.
    round: Option<(SecAggClient, Vec<u32>)>,
}

/// What a result carries after its header.
enum Outgoing {
    Params(Parameters),
    Words(Vec<u32>),
}

/// One thread per job owns the trainer (libtorch tensors are not `Sync`).
fn spawn_worker(
    job_id: String,
    mut trainer: Box<dyn Trainer>,
    mut secagg: Option<SecAggCtx>,
    outbox: Arc<Outbox>,
    chunk_bytes: usize,
    stats: Arc<NodeStats>,
) -> std::sync::mpsc::Sender<Command> {
    let (tx, rx) = std::sync::mpsc::channel::<Command>();
    let spawned = std::thread::Builder::new().name(format!("job-{job_id}")).spawn(move || {
        while let Ok(Command::Task { task, params }) = rx.recv() {
            let (round, task_id) = (task.round, task.task_id);
            let stage = pb::Stage::try_from(task.stage).unwrap_or(pb::Stage::Unspecified);
            match run_task(trainer.as_mut(), &mut secagg, &task, stage, params) {
                Ok((result, outgoing)) => {
                    let examples = result.num_examples;
                    let mut msgs = Vec::new();
                    let mut result = result;
                    let (mut bytes, mut values) = (std::borrow::Cow::Borrowed(&[][..]), 0);
                    match &outgoing {
                        Some(Outgoing::Params(p)) => {
                            let (header, b) = transfer::encode(task_id, p);
                            (result.params, bytes, values) = (Some(header), b.into(), p.num_values());
                        }
                        Some(Outgoing::Words(w)) => {
                            let header = transfer::words_header(task_id, "secagg.masked", w.len());
                            (result.params, bytes, values) = (Some(header), transfer::word_bytes(w), w.len());
                        }
                        None => {}
                    }
                    msgs.push(party_message::Body::Result(result));
                    msgs.extend(transfer::chunks(task_id, &bytes, chunk_bytes).map(party_message::Body::Chunk));
                    for m in msgs {
                        if !outbox.send_blocking(m) {
                            return;
                        }
                    }
                    stats.tasks_done.fetch_add(1, Ordering::Relaxed);
                    let what = match outgoing {
                        Some(Outgoing::Words(_)) => "masked vector only",
                        _ if secagg.is_some() => "secure-aggregation keys or shares only",
                        _ => "parameters, counts and metrics only",
                    };
                    info!(job = %job_id, round, stage = ?stage, values, bytes = values * 4, examples, "sent result ({what})");
                }
                Err(reason) => {
                    warn!(job = %job_id, round, stage = ?stage, "task failed: {reason}");
                    let failed = pb::TaskFailed { job_id: job_id.clone(), task_id, reason };
                    if !outbox.send_blocking(party_message::Body::Failed(failed)) {
                        return;
                    }
                }
            }
        }
        debug!(job = %job_id, "worker ended");
    });
    if let Err(e) = spawned {
        warn!("cannot start a worker thread: {e}");
    }
    tx
}

fn run_task(
    trainer: &mut dyn Trainer,
    secagg: &mut Option<SecAggCtx>,
    task: &pb::Task,
    stage: pb::Stage,
    params: Option<Parameters>,
) -> Result<(pb::TaskResult, Option<Outgoing>), String> {
    let mut result = pb::TaskResult {
        job_id: task.job_id.clone(),
        round: task.round,
        stage: task.stage,
        task_id: task.task_id,
        ..Default::default()
    };
    let started = Instant::now();
    match stage {
        pb::Stage::Setup => {
            let stats = trainer.feature_stats();
            result.num_examples = stats.count;
            result.feature_sum = stats.sum;
            result.feature_sum_sq = stats.sum_sq;
            Ok((result, Some(Outgoing::Params(trainer.parameters()))))
        }
        pb::Stage::Fit if secagg.is_some() => {
            let ctx = secagg.as_mut().ok_or("no secure-aggregation context")?;
            secure_fit(trainer, ctx, task, params, &mut result, started)?;
            Ok((result, None))
        }
        pb::Stage::SecaggShares | pb::Stage::SecaggMasked | pb::Stage::SecaggUnmask => {
            let ctx = secagg.as_mut().ok_or("secure-aggregation task in a plaintext job")?;
            let words = secure_stage(ctx, task, stage, &mut result)?;
            Ok((result, words.map(Outgoing::Words)))
        }
        pb::Stage::Fit => {
            let p = params.ok_or("fit task without parameters")?;
            trainer.set_parameters(&p).map_err(|e| e.to_string())?;
            let cfg: FitConfig =
                serde_json::from_str(&task.config_json).map_err(|e| format!("fit configuration: {e}"))?;
            let outcome = timed_fit(trainer, &cfg)?;
            result.num_examples = outcome.num_examples;
            result.metrics = outcome.metrics.into_iter().collect();
            result.metrics.insert("fit_ms".into(), started.elapsed().as_secs_f64() * 1000.0);
            Ok((result, Some(Outgoing::Params(trainer.parameters()))))
        }
        pb::Stage::Evaluate => {
            let p = params.ok_or("evaluate task without parameters")?;
            trainer.set_parameters(&p).map_err(|e| e.to_string())?;
            let outcome = trainer.evaluate().map_err(|e| e.to_string())?;
            result.num_examples = outcome.num_examples;
            result.loss = outcome.loss;
            result.metrics = outcome.metrics.into_iter().collect();
            Ok((result, None))
        }
        pb::Stage::Unspecified => Err(format!("unknown stage {}", task.stage)),
    }
}

/// Trains, encodes `n/max_examples · (local − global)` plus the weight `n`,
/// and answers with signed round keys. The update never leaves in the clear.
/// Local training alone, timed: `train_ms` lets the coordinator tell the
/// framework's share of a round from the training's.
fn timed_fit(trainer: &mut dyn Trainer, cfg: &FitConfig) -> Result<confide_algorithms::FitOutcome, String> {
    let started = Instant::now();
    let mut outcome = trainer.fit(cfg).map_err(|e| e.to_string())?;
    outcome.metrics.insert("train_ms".into(), started.elapsed().as_secs_f64() * 1000.0);
    Ok(outcome)
}

fn secure_fit(
    trainer: &mut dyn Trainer,
    ctx: &mut SecAggCtx,
    task: &pb::Task,
    params: Option<Parameters>,
    result: &mut pb::TaskResult,
    started: Instant,
) -> Result<(), String> {
    use pb::sec_agg_message::Body;
    let Some(Body::RoundConfig(rc)) = task.secagg.as_ref().and_then(|m| m.body.as_ref()) else {
        return Err("secure fit task without round parameters".into());
    };
    let (cfg, clip, max_examples) =
        wire::config_from_pb(rc, &task.job_id, task.round, ctx.max_values).map_err(|e| e.to_string())?;
    let global = params.ok_or("fit task without parameters")?;
    if cfg.dim != global.num_values() + 1 {
        return Err(format!("secure aggregation over {} values for a model of {}", cfg.dim, global.num_values()));
    }
    trainer.set_parameters(&global).map_err(|e| e.to_string())?;
    let fit: FitConfig = serde_json::from_str(&task.config_json).map_err(|e| format!("fit configuration: {e}"))?;
    let outcome = timed_fit(trainer, &fit)?;
    let n = outcome.num_examples;
    if n == 0 || n > max_examples || n > u64::from(u32::MAX) {
        return Err(format!("this party trained on {n} examples; privacy.max_examples allows 1 to {max_examples}"));
    }
    let scale = (n as f64 / max_examples as f64) as f32;
    let local = trainer.parameters();
    // Clipping would hide a diverged model in the sum: refuse to send it.
    local.check_matches(&global.spec()).map_err(|e| format!("local model after training: {e}"))?;
    let encoding = FixedPoint::new(cfg.bits, 0, clip, cfg.parties.len()).map_err(|e| e.to_string())?;
    // Encoded straight from the two models into the buffer that is later
    // masked in place and sent: no intermediate vectors.
    let mut input = Vec::with_capacity(cfg.dim);
    for (l, g) in local.tensors().iter().zip(global.tensors()) {
        encoding.encode_into(l.data.iter().zip(&g.data).map(|(l, g)| (l - g) * scale), &mut input);
    }
    input.push(n as u32);
    let mut rng = rand_core::OsRng;
    let (client, advert) = SecAggClient::new(cfg, &ctx.me, ctx.key.as_ref(), &mut rng).map_err(|e| e.to_string())?;
    ctx.round = Some((client, input));
    result.metrics = outcome.metrics.into_iter().collect();
    result.metrics.insert("fit_ms".into(), started.elapsed().as_secs_f64() * 1000.0);
    result.secagg = Some(pb::SecAggMessage { body: Some(Body::Advert(wire::keys_to_pb(&advert, &[]))) });
    Ok(())
}

/// Stages 1–3 of the client; returns the masked vector at stage 2.
fn secure_stage(
    ctx: &mut SecAggCtx,
    task: &pb::Task,
    stage: pb::Stage,
    result: &mut pb::TaskResult,
) -> Result<Option<Vec<u32>>, String> {
    use pb::sec_agg_message::Body;
    let body = task.secagg.as_ref().and_then(|m| m.body.as_ref());
    let (client, input) = ctx.round.as_mut().ok_or("no secure-aggregation round in progress")?;
    let mut rng = rand_core::OsRng;
    match (stage, body) {
        (pb::Stage::SecaggShares, Some(Body::Keys(keys))) => {
            let verifier = &mut ctx.verifier;
            let mut adverts = Vec::with_capacity(keys.keys.len());
            for k in &keys.keys {
                let (advert, cert) = wire::keys_from_pb(k).map_err(|e| e.to_string())?;
                verifier.add_peer(&advert.party, &cert).map_err(|e| e.to_string())?;
                adverts.push(advert);
            }
            let verifier: &dyn IdentityVerifier = verifier;
            let shares = client.on_keys(&adverts, verifier, &mut rng).map_err(|e| e.to_string())?;
            result.secagg = Some(pb::SecAggMessage { body: Some(Body::Shares(wire::shares_to_pb(&shares))) });
            Ok(None)
        }
        (pb::Stage::SecaggMasked, Some(Body::Shares(shares))) => {
            let shares = wire::shares_from_pb(shares, 100_000).map_err(|e| e.to_string())?;
            let masked = client.on_shares(&shares, std::mem::take(input)).map_err(|e| e.to_string())?;
            Ok(Some(masked.values))
        }
        (pb::Stage::SecaggUnmask, Some(Body::Unmask(req))) => {
            let answer = client.on_unmask(&wire::unmask_from_pb(req)).map_err(|e| e.to_string())?;
            ctx.round = None;
            result.secagg =
                Some(pb::SecAggMessage { body: Some(Body::UnmaskShares(wire::unmask_shares_to_pb(&answer))) });
            Ok(None)
        }
        (s, _) => Err(format!("{s:?} task without its secure-aggregation payload")),
    }
}

/// The stage names used in job status and in `fault.exit_on_stage`.
fn stage_name(stage: i32) -> &'static str {
    match pb::Stage::try_from(stage).unwrap_or(pb::Stage::Unspecified) {
        pb::Stage::Setup => "setup",
        pb::Stage::Fit => "fit",
        pb::Stage::Evaluate => "evaluate",
        pb::Stage::SecaggShares => "secagg-shares",
        pb::Stage::SecaggMasked => "secagg-masked-input",
        pb::Stage::SecaggUnmask => "secagg-unmask",
        pb::Stage::Unspecified => "unspecified",
    }
}
