//! The session layer's seams, exercised through the real coordinator driver
//! and party nodes (in one process, over loopback mutual TLS):
//!
//! * a test-only aggregation protocol and a test-only job kind, each a
//!   module here plus one registration on each side, with no change to the
//!   session or the drivers (the protocol hides updates, so it also sums
//!   setup statistics and evaluations);
//! * a panicking plug-in strategy fails its own job, naming it, while
//!   another job goes on;
//! * a strategy that cannot aggregate what the protocol reveals is refused
//!   at submission;
//! * a checkpoint that cannot be written fails the job with its cause.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use confide_algorithms::{Capabilities, Error as AlgoError, FedAvg, FitResult, Parameters, State, Strategy};
use confide_coordinator::jobs::{JobKind, Setup};
use confide_coordinator::plugins::Plugins;
use confide_coordinator::server::{self, CoordinatorConfig, RunningCoordinator};
use confide_coordinator::session::{Closed, Context, JobMachine};
use confide_crypto::Error as CryptoError;
use confide_crypto::aggregation::sum::SumLayout;
use confide_crypto::aggregation::{
    Aggregate, AggregationClient, AggregationProtocol, AggregationServer, Bulk, Envelope, JobFacts, LocalUpdate,
    Messages, PartyIdentity, Peer, PeerVerifier, Problem, Progress, Quorum, Reveals, RoundInfo, StageName, SumRound,
};
use confide_crypto::pki::PkiDir;
use confide_party::config::PartyConfig;
use confide_party::node::PartyNode;
use confide_party::plugins::{JobContext, PartyJobKind, PartyPlugins};
use confide_party::session::{JobHandler, TaskError};
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_proto::messages::{ResultBody, Stage, Task, TaskBody};
use confide_proto::net::{ClientIdentity, connect};
use confide_proto::pb::{self, admin_service_client::AdminServiceClient};
use confide_proto::status::{JobState, JobStatus};
use confide_tests::{Federation, independent_fedavg, job_spec, max_abs_diff, repo_root, standardised_start};

// ------------------------------------------------ a test-only protocol

/// The second step of [`TwoStep`].
const UPLOAD: StageName = StageName::new("twostep-upload");

/// A deliberately insecure two-step protocol: at fit a party sends only its
/// example count; in the `twostep-upload` step, asked by its count, it
/// sends its model; the coordinator sums Σ n·(local − global) itself.
struct TwoStep;

impl AggregationProtocol for TwoStep {
    fn name(&self) -> &'static str {
        "test-two-step"
    }
    fn describe(&self) -> &'static str {
        "test only: counts first, then models"
    }
    fn stages(&self) -> &'static [StageName] {
        &[UPLOAD]
    }
    fn reveals(&self) -> Reveals {
        Reveals::WeightedSum
    }
    fn validate(&self, settings: &toml::Table, _: &JobFacts) -> Vec<Problem> {
        settings.keys().map(|k| Problem::setting(k, "takes no settings")).collect()
    }
    fn server(
        &self,
        _: &toml::Table,
        _: &JobFacts,
        _: Box<dyn PeerVerifier>,
    ) -> Result<Box<dyn AggregationServer>, CryptoError> {
        Ok(Box::new(TwoStepServer::default()))
    }
    fn client(
        &self,
        _: &toml::Table,
        _: &JobFacts,
        _: PartyIdentity,
    ) -> Result<Box<dyn AggregationClient>, CryptoError> {
        Ok(Box::new(TwoStepClient::default()))
    }
}

#[derive(Default)]
struct TwoStepServer {
    /// A sum of statistics (setup, evaluation) is in progress: one step, values in the clear.
    summing: Option<Vec<f64>>,
    global: Option<Parameters>,
    uploading: bool,
    counts: BTreeMap<String, u64>,
    sum: Vec<f64>,
    contributors: Vec<String>,
}

fn bad(party: &str, reason: &str) -> CryptoError {
    CryptoError::PeerMisbehaved { party: party.into(), reason: reason.into() }
}

impl AggregationServer for TwoStepServer {
    fn begin_round(&mut self, round: &RoundInfo<'_>) -> Result<Vec<u8>, CryptoError> {
        *self = TwoStepServer { global: Some(round.global.clone()), ..TwoStepServer::default() };
        self.sum = vec![0.0; round.global.num_values()];
        Ok(b"two-step".to_vec())
    }
    fn begin_sum(&mut self, round: &SumRound<'_>) -> Result<Vec<u8>, CryptoError> {
        *self = TwoStepServer { summing: Some(vec![0.0; round.layout.values]), ..TwoStepServer::default() };
        Ok(b"two-step sum".to_vec())
    }
    fn on_message(&mut self, from: Peer<'_>, message: Envelope) -> Result<(), CryptoError> {
        if let Some(sum) = self.summing.as_mut() {
            if message.body.len() != sum.len() * 8 {
                return Err(bad(from.name, "a sum of the wrong length"));
            }
            for (s, v) in sum.iter_mut().zip(message.body.chunks_exact(8)) {
                *s += f64::from_le_bytes(v.try_into().map_err(|_| bad(from.name, "bad value"))?);
            }
            self.contributors.push(from.name.into());
            return Ok(());
        }
        let global = self.global.as_ref().ok_or_else(|| CryptoError::WrongStage("no round".into()))?;
        if !self.uploading {
            let n = u64::from_le_bytes(message.body.as_slice().try_into().map_err(|_| bad(from.name, "bad count"))?);
            self.counts.insert(from.name.into(), n);
            return Ok(());
        }
        let n = *self.counts.get(from.name).ok_or_else(|| bad(from.name, "uploaded without a count"))?;
        let Some(Bulk::Params(local)) = message.bulk else { return Err(bad(from.name, "no model")) };
        local.check_matches(&global.spec()).map_err(|e| bad(from.name, &e))?;
        for (s, (l, g)) in self.sum.iter_mut().zip(local.flat_values().zip(global.flat_values())) {
            *s += n as f64 * f64::from(l - g);
        }
        self.contributors.push(from.name.into());
        Ok(())
    }
    fn close_stage(&mut self) -> Result<Progress, CryptoError> {
        if let Some(sums) = self.summing.take() {
            self.contributors.sort();
            let contributors = std::mem::take(&mut self.contributors);
            return Ok(Progress::Done(Aggregate::Sum { sums, misbehaved: Vec::new(), contributors }));
        }
        if !self.uploading {
            self.uploading = true;
            let messages =
                self.counts.iter().map(|(p, n)| (p.clone(), Envelope::body(n.to_le_bytes().to_vec()))).collect();
            return Ok(Progress::Step {
                stage: UPLOAD,
                messages: Messages::PerParty(messages),
                quorum: Quorum::JobMinimum,
            });
        }
        self.contributors.sort();
        let total = self.contributors.iter().map(|p| self.counts[p] as f64).sum();
        Ok(Progress::Done(Aggregate::WeightedSum {
            weighted_delta_sum: std::mem::take(&mut self.sum),
            total_examples: total,
            mean_train_loss: None,
            misbehaved: Vec::new(),
            contributors: std::mem::take(&mut self.contributors),
        }))
    }
}

#[derive(Default)]
struct TwoStepClient {
    pending: Option<(u64, Parameters)>,
}

impl AggregationClient for TwoStepClient {
    fn contribute(&mut self, _: u32, round_message: &[u8], update: LocalUpdate<'_>) -> Result<Envelope, CryptoError> {
        if round_message != b"two-step" {
            return Err(bad("coordinator", "unexpected round message"));
        }
        self.pending = Some((update.num_examples, update.local));
        Ok(Envelope::body(update.num_examples.to_le_bytes().to_vec()))
    }
    fn contribute_sum(
        &mut self,
        _: u32,
        round_message: &[u8],
        _: &SumLayout,
        values: &[f64],
    ) -> Result<Envelope, CryptoError> {
        if round_message != b"two-step sum" {
            return Err(bad("coordinator", "unexpected round message"));
        }
        Ok(Envelope::body(values.iter().flat_map(|v| v.to_le_bytes()).collect()))
    }
    fn on_step(&mut self, _: u32, stage: StageName, message: Envelope) -> Result<Envelope, CryptoError> {
        let (n, local) = self.pending.take().ok_or_else(|| CryptoError::WrongStage("nothing to upload".into()))?;
        if stage != UPLOAD || message.body != n.to_le_bytes() {
            return Err(bad("coordinator", "asked for another party's upload"));
        }
        Ok(Envelope { body: Vec::new(), bulk: Some(Bulk::Params(Arc::new(local))) })
    }
    fn abandon(&mut self) {
        self.pending = None;
    }
}

// ------------------------------------------------ a test-only job kind

/// The one stage of `row-count`.
const REPORT: StageName = StageName::new("rowcount-report");

/// `row-count`: every party reports how many rows its data set has; the job
/// records the total. Coordinator side.
struct RowCount;

struct RowCountMachine {
    total: u64,
}

impl JobKind for RowCount {
    fn name(&self) -> &'static str {
        "row-count"
    }
    fn check(&self, _: &JobSpec, _: &Plugins) -> Result<(), String> {
        Ok(())
    }
    fn machine(&self, _: &Setup<'_>) -> Result<Box<dyn JobMachine>, String> {
        Ok(Box::new(RowCountMachine { total: 0 }))
    }
}

impl JobMachine for RowCountMachine {
    fn start(&mut self, cx: &mut Context<'_>) {
        cx.begin_round(1);
        let stage = Stage::Extension(REPORT);
        let to = cx.available(stage, 1);
        let body = TaskBody::Extension { stage: REPORT.as_str().into(), message: Envelope::default() };
        cx.collect(stage, 1, vec![(to, body)], Quorum::JobMinimum);
    }
    fn on_result(&mut self, _: &mut Context<'_>, party: &str, result: ResultBody) -> Result<(), String> {
        let ResultBody::Extension { message, .. } = result else { return Err(format!("{party}: not a row count")) };
        self.total += u64::from_le_bytes(message.body.as_slice().try_into().map_err(|_| "a row count is 8 bytes")?);
        Ok(())
    }
    fn on_closed(&mut self, cx: &mut Context<'_>, closed: Closed) {
        let mut record = cx.take_record();
        if let Some(r) = record.as_mut() {
            r.metrics.insert("rows".into(), self.total as f64);
            r.participants = closed.answered.into_iter().collect();
        }
        cx.checkpoint(1, None, record, State::new());
    }
    fn on_persisted(&mut self, cx: &mut Context<'_>, _: u32) {
        cx.finish(JobState::Succeeded, None);
    }
}

/// `row-count` at a party: counts its rows.
struct RowCountParty;

struct RowCounter {
    rows: u64,
}

impl PartyJobKind for RowCountParty {
    fn name(&self) -> &'static str {
        "row-count"
    }
    fn stages(&self) -> &'static [StageName] {
        &[REPORT]
    }
    fn handler(&self, cx: JobContext<'_>) -> Result<Box<dyn JobHandler>, String> {
        let rows = cx.dataset.load().map_err(|e| e.to_string())?.len() as u64;
        Ok(Box::new(RowCounter { rows }))
    }
}

impl JobHandler for RowCounter {
    fn on_task(&mut self, task: Task) -> Result<ResultBody, TaskError> {
        match task.body {
            TaskBody::Extension { stage, .. } if stage == REPORT.as_str() => {
                Ok(ResultBody::Extension { stage, message: Envelope::body(self.rows.to_le_bytes().to_vec()) })
            }
            other => Err(TaskError::CoordinatorFault(format!("row-count has no {} stage", other.stage_name()))),
        }
    }
}

// ------------------------------------------------ the harness

/// A coordinator and party nodes in this process, with the given plugins.
struct InProcess {
    fed: Federation,
    coordinator: Option<RunningCoordinator>,
    parties: Vec<tokio::task::JoinHandle<()>>,
    admin: AdminServiceClient<tonic::transport::Channel>,
}

impl InProcess {
    async fn start(
        plugins: Plugins,
        party_plugins: PartyPlugins,
        policy: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let names = ["hospital-a", "hospital-b", "hospital-c"];
        let mut fed = Federation::new(&names, &repo_root().join("examples/data/breast_cancer.csv"), true, "5,3,2");
        let data_dir = fed.path("coordinator");
        prepare(&data_dir);
        let config = CoordinatorConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            data_dir,
            pki: fed.path("pki"),
            limits: Limits::default(),
            models: Default::default(),
            metrics: Default::default(),
        };
        let coordinator = server::start_with(config, plugins).await.expect("coordinator");
        fed.addr = coordinator.local_addr.to_string();
        let mut parties = Vec::new();
        for n in names {
            let cfg = PartyConfig::load_with(&fed.party_config(n, policy), &party_plugins).expect("party config");
            let node = PartyNode::with_plugins(cfg, party_plugins.clone());
            parties.push(tokio::spawn(async move { node.run().await }));
        }
        let pki = PkiDir::new(fed.path("pki"));
        let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
        let url = format!("https://{}", fed.addr);
        let id = ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
        let admin = AdminServiceClient::new(connect(&id).await.expect("admin connection"));
        InProcess { fed, coordinator: Some(coordinator), parties, admin }
    }

    async fn submit(&mut self, spec: &str) -> Result<String, tonic::Status> {
        let req = pb::SubmitJobRequest { spec_toml: spec.into(), file_name: "job.toml".into(), grant: None };
        Ok(self.admin.submit_job(req).await?.into_inner().job_id)
    }

    async fn wait_done(&mut self, id: &str) -> JobStatus {
        for _ in 0..2400 {
            let st =
                self.admin.get_job(pb::JobRef { job_id: id.into(), round: None }).await.expect("status").into_inner();
            let st = JobStatus::try_from(st).expect("typed status");
            if st.state.is_terminal() {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("job {id} did not end\n{}", self.fed.logs());
    }

    async fn model(&mut self, id: &str) -> Parameters {
        let mut stream =
            self.admin.get_model(pb::JobRef { job_id: id.into(), round: None }).await.expect("model").into_inner();
        let mut bytes = Vec::new();
        while let Some(c) = stream.message().await.expect("chunk") {
            bytes.extend_from_slice(&c.data);
        }
        Parameters::from_safetensors(&bytes).expect("safetensors")
    }

    async fn stop(mut self) {
        for p in &self.parties {
            p.abort();
        }
        if let Some(c) = self.coordinator.take() {
            c.stop().await;
        }
    }
}

const LOGREG: &str = "kind = \"logistic_regression\"\nclasses = 2";

// ------------------------------------------------ the tests

/// A registered protocol that hides updates but states no tolerated
/// fraction of corrupt parties: a hospital with a collusion floor refuses
/// it (its guarantee under collusion is unknown), one without accepts it.
#[test]
fn a_protocol_stating_no_collusion_bound_is_refused_under_a_collusion_floor() {
    let party_plugins = PartyPlugins::new().protocol(TwoStep);
    let names: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    let text = job_spec(&names, 3, 2, LOGREG, "seed = 3") + "[aggregation]\nprotocol = \"test-two-step\"\n";
    let spec = JobSpec::parse_with(&text, "job.toml", &Limits::default(), party_plugins.protocols()).expect("spec");
    let dataset = spec.parties.dataset.clone();
    let data = BTreeMap::from([(dataset.clone(), confide_algorithms::data::DatasetSource::csv("d.csv".into()))]);
    let config = |extra: &str| {
        let text = format!("[policy]\naggregation = [\"test-two-step\"]\n{extra}");
        let table: toml::Table = toml::from_str(&text).expect("policy");
        table["policy"].clone().try_into::<confide_party::config::Policy>().expect("policy")
    };
    assert!(confide_party::policy::consider(&spec, &dataset, &config(""), &party_plugins, &data).is_ok());
    let floor = config("min_corrupt_fraction = 0.1\n");
    let e = confide_party::policy::consider(&spec, &dataset, &floor, &party_plugins, &data).unwrap_err();
    assert!(e.contains("states no fraction of corrupt parties"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_registered_in_one_place_runs_through_the_unchanged_session_and_drivers() {
    let plugins = Plugins::new().protocol(TwoStep);
    let party_plugins = PartyPlugins::new().protocol(TwoStep);
    let mut f = InProcess::start(plugins, party_plugins, "[policy]\naggregation = [\"test-two-step\"]\n", |_| {}).await;
    let text = job_spec(&f.fed.names, 3, 2, LOGREG, "seed = 3") + "[aggregation]\nprotocol = \"test-two-step\"\n";
    let id = f.submit(&text).await.expect("submitted");
    let st = f.wait_done(&id).await;
    assert_eq!(st.state, JobState::Succeeded, "{st:#?}\n{}", f.fed.logs());
    assert_eq!(st.privacy.aggregation, "test-two-step");
    assert!(st.history[1].metrics.contains_key("stage_twostep_upload_ms"), "{:?}", st.history[1].metrics);
    // The protocol hides values, so setup's feature sums and the evaluation
    // went through its sums too (the model below starts from them).
    let accuracy = st.history[1].metrics.get("accuracy").copied().unwrap_or_default();
    assert!(accuracy > 0.8, "{:?}", st.history[1].metrics);
    let model = f.model(&id).await;

    // The same rounds by hand: the protocol's sum feeds FedAvg's secure path.
    let spec = JobSpec::parse_with(&text, "job.toml", &Limits::default(), Plugins::new().protocol(TwoStep).protocols())
        .expect("spec");
    let mut trainers = f.fed.trainers(|data, n| BuiltinTrainers::default().build(&spec, data, n).expect("trainer"));
    let start = standardised_start(&trainers);
    let expected = independent_fedavg(&mut trainers, start, &spec.training, 2);
    assert!(max_abs_diff(&model, &expected) <= 1e-5, "the two-step aggregate is not FedAvg");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_kind_registered_in_one_place_runs_through_the_unchanged_session_and_drivers() {
    let plugins = Plugins::new().job_kind(RowCount);
    let party_plugins = PartyPlugins::new().job_kind(RowCountParty);
    let policy = "[policy]\njob_kinds = [\"train\", \"row-count\"]\n";
    let mut f = InProcess::start(plugins, party_plugins, policy, |_| {}).await;
    let text = job_spec(&f.fed.names, 3, 1, LOGREG, "").replace("kind = \"train\"", "kind = \"row-count\"");
    let id = f.submit(&text).await.expect("submitted");
    let st = f.wait_done(&id).await;
    assert_eq!(st.state, JobState::Succeeded, "{st:#?}\n{}", f.fed.logs());
    let rows: usize = f.fed.names.iter().map(|n| f.fed.party_data(n).load().expect("rows").len()).sum();
    assert_eq!(st.metrics["rows"], rows as f64);
    assert_eq!(st.history[0].participants, f.fed.names);
    assert!(st.history[0].metrics.contains_key("stage_rowcount_report_ms"));
    assert!(st.model.is_none(), "a kind without a model checkpoints none");
    // An unregistered kind is refused at submission, by field.
    let err = f.submit(&text.replace("row-count", "row-sum")).await.unwrap_err();
    assert!(err.message().contains("kind: no job kind named \"row-sum\""), "{}", err.message());
    f.stop().await;
}

/// Panics when it aggregates.
struct Boom;

impl Strategy for Boom {
    fn name(&self) -> &str {
        "boom"
    }
    fn aggregate_fit(&mut self, _: u32, _: &Parameters, _: &[FitResult]) -> Result<Parameters, AlgoError> {
        panic!("the plug-in has a bug")
    }
}

/// FedAvg without secure-sum support.
struct PlainOnly;

impl Strategy for PlainOnly {
    fn name(&self) -> &str {
        "plain-only"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::INDIVIDUAL_UPDATES
    }
    fn aggregate_fit(&mut self, r: u32, g: &Parameters, res: &[FitResult]) -> Result<Parameters, AlgoError> {
        FedAvg.aggregate_fit(r, g, res)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_strategy_fails_its_job_by_name_while_another_job_goes_on() {
    let plugins =
        Plugins::new().strategy("boom", |_| Ok(Box::new(Boom))).strategy("plain-only", |_| Ok(Box::new(PlainOnly)));
    let policy = "[policy]\naggregation = [\"none\", \"secagg\"]\n";
    let mut f = InProcess::start(plugins, PartyPlugins::new(), policy, |_| {}).await;
    let boom = job_spec(&f.fed.names, 3, 2, LOGREG, "") + "[strategy]\nname = \"custom\"\ncustom = \"boom\"\n";
    let fine = job_spec(&f.fed.names, 3, 3, LOGREG, "seed = 5");
    let boom_id = f.submit(&boom).await.expect("submitted");
    let fine_id = f.submit(&fine).await.expect("submitted");
    let st = f.wait_done(&boom_id).await;
    assert_eq!(st.state, JobState::Failed);
    let err = st.error.unwrap_or_default();
    assert!(err.contains("strategy boom panicked") && err.contains("the plug-in has a bug"), "{err}");
    let st = f.wait_done(&fine_id).await;
    assert_eq!(st.state, JobState::Succeeded, "{st:#?}");
    assert_eq!(st.rounds_completed, 3);

    // Capabilities are checked at submission, not after round 1.
    let secure = job_spec(&f.fed.names, 3, 2, LOGREG, "")
        + "[strategy]\nname = \"custom\"\ncustom = \"plain-only\"\n[aggregation]\nprotocol = \"secagg\"\n";
    let err = f.submit(&secure).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("strategy.custom: strategy plain-only needs individual updates")
            && err.message().contains("reveals only their weighted sum"),
        "{}",
        err.message()
    );
    f.stop().await;
}

/// A coordinator whose models directory cannot be made (a file is in the
/// way) refuses to start, naming it, rather than failing each job's first
/// checkpoint.
#[tokio::test]
async fn a_coordinator_whose_models_directory_cannot_be_made_refuses_to_start() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fed = Federation::new(&["hospital-a"], &repo_root().join("examples/data/breast_cancer.csv"), true, "1");
    let data_dir = fed.path("coordinator");
    std::fs::create_dir_all(&data_dir).expect("data dir");
    std::fs::write(data_dir.join("models"), b"not a directory").expect("file");
    let config = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        data_dir: data_dir.clone(),
        pki: fed.path("pki"),
        limits: Limits::default(),
        models: Default::default(),
        metrics: Default::default(),
    };
    let err = server::start_with(config, Plugins::new()).await.err().expect("refused").to_string();
    assert!(err.contains(&data_dir.join("models").display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_cannot_be_written_fails_the_job_with_its_cause() {
    let mut f = InProcess::start(Plugins::new(), PartyPlugins::new(), "", |_| {}).await;
    // The models directory replaced by a file once the coordinator runs:
    // every checkpoint write fails.
    let models = f.fed.path("coordinator").join("models");
    std::fs::remove_dir(&models).expect("models dir");
    std::fs::write(&models, b"not a directory").expect("file");
    let id = f.submit(&job_spec(&f.fed.names, 3, 2, LOGREG, "")).await.expect("submitted");
    let st = f.wait_done(&id).await;
    assert_eq!(st.state, JobState::Failed);
    let err = st.error.unwrap_or_default();
    assert!(err.contains("round 0: cannot save the checkpoint") && err.contains("models"), "{err}");
    assert!(!err.contains("cancelled"), "{err}");
    f.stop().await;
}
