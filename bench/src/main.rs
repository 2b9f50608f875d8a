//! `confide-bench`: whole-round benchmarks printing one JSON object per
//! configuration, so that privacy overheads are ratios measured in one run.
//!
//! `round` runs the coordinator and N parties as tasks of one tokio runtime,
//! talking gRPC over loopback mutual TLS 1.3 exactly as separate processes
//! would. Parties run a synthetic trainer (one cheap pass over the
//! parameters), so the figures are the framework's cost, not a model's.

mod he_bench;
mod incremental_bench;
mod inproc;
mod joint_bench;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use confide_algorithms::data::{CsvOptions, DatasetSource};
use confide_algorithms::{
    Error as AlgoError, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Metrics, Parameters, Tensor, Trainer,
};
use confide_coordinator::server::{self, CoordinatorConfig};
use confide_crypto::pki::PkiDir;
use confide_party::config::{PartyConfig, Policy, Reconnect};
use confide_party::node::{NodeStats, PartyNode};
use confide_party::trainers::TrainerFactory;
use confide_proto::Limits;
use confide_proto::jobspec::{AggregationSpec, JobSpec};
use confide_proto::net::{ClientIdentity, connect};
use confide_proto::pb::{self, admin_service_client::AdminServiceClient};
use confide_proto::status::JobStatus;

#[derive(Parser, Debug)]
#[command(name = "confide-bench", about = "Confide benchmarks (JSON output)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Whole federated rounds over loopback mutual TLS.
    Round {
        /// Party counts (comma-separated for a table).
        #[arg(long, value_delimiter = ',', default_value = "10")]
        parties: Vec<usize>,
        /// Model sizes in f32 parameters (comma-separated for a table).
        #[arg(long, value_delimiter = ',', default_value = "1000000")]
        params: Vec<usize>,
        /// Privacy modes (comma-separated): none, secagg, secagg-dp
        /// (party-level distributed DP under secagg, 32-bit words),
        /// secagg-dp24 (the same at 24 bits), he.
        #[arg(long, value_delimiter = ',', default_value = "none")]
        privacy: Vec<String>,
        /// Measured rounds per configuration.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Repetitions: every configuration runs this many times, interleaved,
        /// and the figures are medians across repetitions (shared machines
        /// are noisy; interleaving spreads a slow spell over every mode).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Run the parties in this many child processes instead of in the
        /// coordinator's process, so that the coordinator's own CPU time and
        /// memory per party can be measured (0: one process).
        #[arg(long, default_value_t = 0)]
        party_processes: usize,
        /// Prometheus metrics (comma-separated for a comparison): `off`, or
        /// `on` (served by the coordinator and the in-process parties and
        /// scraped every 200 ms).
        #[arg(long, value_delimiter = ',', default_value = "off")]
        metrics: Vec<String>,
        /// Print JSON objects, one per line (the default output format).
        #[arg(long)]
        json: bool,
    },
    /// (Internal) Runs synthetic party nodes for `round --party-processes`
    /// until its standard input closes, then prints their traffic as JSON.
    #[command(hide = true)]
    ServeParties {
        /// The coordinator's URL.
        #[arg(long)]
        url: String,
        /// The federation's PKI directory.
        #[arg(long)]
        pki: PathBuf,
        /// Parameters of the synthetic model.
        #[arg(long)]
        params: usize,
        /// The parties to run (comma-separated).
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// Rounds of distributed-DP noise each party draws ahead.
        #[arg(long, default_value_t = 1)]
        noise_rounds_ahead: usize,
    },
    /// Local training with libtorch: steps per second for the demo's MLP and
    /// for the CNN on the digits, and the per-round framework overhead of the
    /// demo's federation (round time minus the slowest party's training).
    Train {
        /// Measured epochs for the throughput figures.
        #[arg(long, default_value_t = 20)]
        epochs: u32,
        /// Measured federated rounds for the overhead figure.
        #[arg(long, default_value_t = 10)]
        rounds: u32,
        /// Privacy modes for the overhead figure (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "none,secagg")]
        privacy: Vec<String>,
    },
    /// Differential privacy: exact discrete Gaussian noise for a vector on
    /// one party (against OpenDP's sampler in the same run) and the RDP
    /// accountant's ε for a DP-SGD run.
    Dp {
        /// Noise coordinates.
        #[arg(long, default_value_t = 1_000_000)]
        coordinates: usize,
        /// The noise's standard deviation, on the integer lattice.
        #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
        sigma: Vec<u32>,
        /// OpenDP samples to time (its rate is extrapolated to `coordinates`).
        #[arg(long, default_value_t = 30_000)]
        opendp_samples: usize,
        /// Accountant steps (Poisson-subsampled Gaussian, q = 0.01, z = 1.1, δ = 1e-5).
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Timed repetitions (medians are reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// Threshold-HE steps (key generation, encryption, server addition,
    /// linear hash, decryption shares, combination) and bytes per party.
    He {
        /// Party counts (comma-separated for a table).
        #[arg(long, value_delimiter = ',', default_value = "3,10,50")]
        parties: Vec<usize>,
        /// Values per update.
        #[arg(long, default_value_t = 1_000_000)]
        values: usize,
        /// Plaintext bits (capped at what the parameters allow).
        #[arg(long, default_value_t = 24)]
        bits: u32,
        /// Timed repetitions (medians are reported).
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// DP-SGD's local training against non-private training, time per step,
    /// same run: the demo MLP on the breast-cancer rows, the digits CNN
    /// (libtorch) and the pure-Rust logistic regression.
    DpSgd {
        /// Steps timed per measurement.
        #[arg(long, default_value_t = 200)]
        steps: u64,
        /// Timed repetitions (medians are reported).
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
    /// The party's local prediction endpoint: requests and rows per second
    /// and p50/p99 latency for the demo MLP (breast cancer, hidden [32, 16],
    /// one libtorch thread), for each client count and request size. The
    /// load generator runs in the same process (2 tokio workers).
    Serve {
        /// Concurrent keep-alive connections (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// Rows per request (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        rows_per_request: Vec<usize>,
        /// Seconds per configuration.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Hard-example mining on the UCI digits: an edge MLP and a cloud CNN,
    /// each rule at several thresholds, against edge-only and cloud-only
    /// (fraction forwarded, accuracy, McNemar's test against cloud-only).
    Joint {
        /// Training epochs of both models.
        #[arg(long, default_value_t = 30)]
        epochs: u32,
        /// Instead: latency through a federation in this process (an edge
        /// party, a cloud party, the coordinator), the models trained by
        /// one-party jobs of `epochs` rounds.
        #[arg(long)]
        latency: bool,
        /// Concurrent clients of the edge's endpoint (with --latency).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds per configuration (with --latency).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// An incremental pipeline on the UCI digits in a federation in this
    /// process: time from each trigger to the deployed version, the
    /// framework's share of it, and from a batch landing to the new
    /// version answering at the serving party.
    Incremental {
        /// Batches after the first (one iteration each).
        #[arg(long, default_value_t = 3)]
        batches: usize,
        /// The pipeline's poll interval (seconds).
        #[arg(long, default_value_t = 0.2)]
        poll_secs: f64,
    },
    /// Load a running prediction endpoint (a party's `[serve] listen`) and
    /// report throughput, latency, failures and which deployments answered.
    Load {
        /// The endpoint's address.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// The service.
        #[arg(long)]
        service: String,
        /// Rows to send: a labelled CSV (the label column is dropped).
        #[arg(long)]
        data: PathBuf,
        /// The CSV starts with a header line.
        #[arg(long)]
        header: bool,
        /// Rows per request.
        #[arg(long, default_value_t = 1)]
        rows_per_request: usize,
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Per-party and server cost of SecAgg+ as the federation grows (the
    /// protocol alone, in one process, no network).
    SecaggScaling {
        /// Party counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "10,50,100,200")]
        parties: Vec<usize>,
        /// Vector length.
        #[arg(long, default_value_t = 100_000)]
        params: usize,
    },
}

// The protocol-only benchmark uses a hash tag instead of ECDSA, so the
// figures are the protocol's own cost.
use confide_crypto::secagg::testing::{InsecureTagSigner as BenchSigner, InsecureTagVerifier as BenchVerifier};

/// The `serve` benchmark: a party serving the demo MLP on its endpoint,
/// deployed the way a coordinator would (signed, pulled, verified).
async fn serve_bench(clients: &[usize], rows: &[usize], seconds: f64) -> Result<Vec<serde_json::Value>, String> {
    use confide_proto::deploy::{DeployAction, DeploymentRecord, SignedDeployment};
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let pki = PkiDir::new(dir.path().join("pki"));
    pki.init("bench", &["site-0".into()], &[]).map_err(|e| e.to_string())?;
    let cfg_path = dir.path().join("site-0.toml");
    let text = format!(
        "coordinator = \"https://127.0.0.1:1\"\nca = {:?}\ncert = {:?}\nkey = {:?}\n[training]\nthreads = 1\n\
         [serve]\nservices = [\"demo\"]\nlisten = \"127.0.0.1:0\"\n",
        pki.ca_cert(),
        pki.party_cert("site-0"),
        pki.party_key("site-0")
    );
    std::fs::write(&cfg_path, text).map_err(|e| e.to_string())?;
    let cfg = PartyConfig::load(&cfg_path).map_err(|e| e.to_string())?;
    let data = repo_root().join("examples/data/breast_cancer.csv");
    let ds = confide_algorithms::data::Dataset::load_csv(&data, &CsvOptions { header: true, label_column: -1 })
        .map_err(|e| e.to_string())?;
    // The demo's MLP, trained one epoch (the figures do not depend on the weights).
    let model = confide_algorithms::ModelConfig::mlp(2, vec![32, 16]);
    let (train, held_out) = ds.shuffle_split(0.2, 1);
    let t = joint_bench::train(&model, &train, &held_out, 1)?;
    let bytes = t.parameters().and_then(|p| p.to_safetensors(&Default::default())).map_err(|e| e.to_string())?;
    let record = DeploymentRecord {
        service: "demo".into(),
        sequence: 1,
        action: DeployAction::Deploy,
        job_id: "bench".into(),
        round: 1,
        sha256: confide_party::serving::sha256_hex(&bytes),
        architecture: toml::to_string(&model).map_err(|e| e.to_string())?,
        rollback_to: None,
        issued_at: 0,
        admin: confide_crypto::pki::ADMIN_NAME.into(),
        joint: None,
        pipeline: None,
    };
    let (key, cert_der, _) = confide_proto::deploy::admin_signer(&pki).map_err(|e| e.to_string())?;
    let signed = SignedDeployment::sign(record, &key, cert_der).map_err(|e| e.to_string())?;
    let node = PartyNode::with_plugins(cfg, confide_party::plugins::PartyPlugins::default());
    let addr = node.start_serving().await.map_err(|e| e.to_string())?.ok_or("the endpoint did not start")?;
    let registry = node.serving().ok_or("not serving")?;
    let pull = registry.offer(&signed.to_pb())?.ok_or("nothing to pull")?;
    let part = pb::ModelPart {
        service: pull.service,
        sequence: pull.sequence,
        total_bytes: bytes.len() as u64,
        offset: 0,
        data: bytes.clone().into(),
        error: String::new(),
    };
    let (d, got) = registry.on_part(part)?.ok_or("incomplete model")?;
    registry.install(d, &got, false)?;
    let mut out = Vec::new();
    for &r in rows {
        for &c in clients {
            let body = confide_bench::loadgen::body(&ds.features, ds.num_features, r.max(1));
            let report = confide_bench::loadgen::run(
                addr,
                "/v1/services/demo/predict",
                body,
                r.max(1),
                c,
                Duration::from_secs_f64(seconds.max(0.1)),
            )
            .await;
            let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
            v["bench"] = "serve".into();
            v["model"] = "mlp [32, 16], 30 features, 2 classes".into();
            out.push(v);
        }
    }
    Ok(out)
}

/// Runs one SecAgg+ round over `n` parties and reports per-stage costs.
fn secagg_scaling(n: usize, dim: usize) -> Result<serde_json::Value, String> {
    use confide_crypto::secagg::params::{ThreatModel, choose};
    use confide_crypto::secagg::protocol::{Client, Config, Server};
    use std::time::Instant;
    // The default threat model of [aggregation.secagg].
    let tm = ThreatModel { corrupt_fraction: 0.05, dropout_fraction: 0.1 };
    let chosen = choose(n, &tm).map_err(|e| e.to_string())?;
    let (degree, threshold) = (chosen.degree, chosen.threshold);
    let k = degree;
    let cfg = Config {
        job: "scaling".into(),
        round: 1,
        parties: (0..n).map(|i| format!("p{i:04}")).collect(),
        threshold,
        degree,
        graph_seed: [3; 32],
        bits: 32,
        dim,
        binding: [0; 32],
        min_survivors: 3,
    };
    let e = |e: confide_crypto::Error| e.to_string();
    let mut rng = rand_core::OsRng;
    let mut server = Server::new(cfg.clone()).map_err(e)?;
    let mut clients = Vec::with_capacity(n);
    for p in &cfg.parties {
        let (c, m) = Client::new(cfg.clone(), p, &BenchSigner(p.clone()), &mut rng).map_err(e)?;
        server.on_keys(m, &BenchVerifier).map_err(e)?;
        clients.push(c);
    }
    server.close_keys().map_err(e)?;
    let mut share_ms = Vec::new();
    for (c, p) in clients.iter_mut().zip(&cfg.parties) {
        let keys = server.keys_for(p).map_err(e)?;
        let t = Instant::now();
        let shares = c.on_keys(&keys, &BenchVerifier, &mut rng).map_err(e)?;
        share_ms.push(t.elapsed().as_secs_f64() * 1e3);
        server.on_shares(p, shares).map_err(e)?;
    }
    server.close_shares().map_err(e)?;
    let input = vec![1u32; dim];
    let (mut mask_ms, mut accumulate_ms) = (Vec::new(), Vec::new());
    for (c, p) in clients.iter_mut().zip(&cfg.parties) {
        let shares = server.shares_for(p);
        let input = input.clone();
        let t = Instant::now();
        let y = c.on_shares(&shares, input).map_err(e)?;
        mask_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        server.on_masked(y).map_err(e)?;
        accumulate_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The same masking work on one core, for machines or runtimes where
    // apply_masks cannot split the vector across threads.
    let one_core_ms = {
        use confide_crypto::secagg::prim::MaskStreams;
        let seeds: Vec<[u8; 32]> = (0..=k as u8).map(|i| [i; 32]).collect();
        let masks: Vec<(&[u8; 32], bool)> = seeds.iter().map(|s| (s, false)).collect();
        let mut v = input.clone();
        let t = Instant::now();
        MaskStreams::new(&[0u8; 12], &masks, cfg.bits).apply_all(&mut v);
        t.elapsed().as_secs_f64() * 1e3
    };
    confide_crypto::secagg::testing::consistency_and_unmask(&mut server, clients.iter_mut()).map_err(e)?;
    let t = Instant::now();
    let (sum, _) = server.finish().map_err(e)?;
    let unmask_ms = t.elapsed().as_secs_f64() * 1e3;
    if sum.iter().any(|&v| v != n as u32) {
        return Err("wrong sum".into());
    }
    Ok(serde_json::json!({
        "bench": "secagg_scaling",
        "parties": n,
        "params": dim,
        "degree": k,
        "threshold": threshold,
        "client_share_keys_ms_median": median(share_ms),
        "client_mask_ms_median": median(mask_ms),
        "client_mask_one_core_ms": one_core_ms,
        "server_accumulate_ms_median": median(accumulate_ms),
        "server_unmask_ms": unmask_ms,
        "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
    }))
}

/// One parameter vector; "training" adds a small deterministic step, so the
/// cost is one pass over the values, as for a real update.
struct SyntheticTrainer {
    params: Parameters,
}

impl Trainer for SyntheticTrainer {
    fn parameters(&self) -> Result<Parameters, AlgoError> {
        Ok(self.params.clone())
    }
    fn set_parameters(&mut self, p: &Parameters) -> Result<(), AlgoError> {
        p.check_matches(&self.params.spec()).map_err(AlgoError::InvalidInput)?;
        self.params = p.clone();
        Ok(())
    }
    fn feature_stats(&self) -> FeatureStats {
        FeatureStats::default()
    }
    fn fit(&mut self, c: &FitConfig) -> Result<FitOutcome, AlgoError> {
        let step = 1e-3 * c.round as f32;
        for (_, v) in self.params.values_mut() {
            for (i, x) in v.iter_mut().enumerate() {
                *x += step * (i % 7) as f32;
            }
        }
        Ok(FitOutcome { num_examples: 100, metrics: Metrics::new() })
    }
    fn evaluate(&mut self) -> Result<EvalOutcome, AlgoError> {
        Ok(EvalOutcome { num_examples: 100, loss: 0.0, metrics: Metrics::new() })
    }
    fn predict(&self, _: &[f32]) -> Result<Vec<f32>, AlgoError> {
        Ok(Vec::new())
    }
}

struct SyntheticFactory {
    params: usize,
}

impl TrainerFactory for SyntheticFactory {
    fn build(&self, _: &JobSpec, _: &DatasetSource, _: &str) -> Result<Box<dyn Trainer>, String> {
        let t = Tensor { name: "w".into(), shape: vec![self.params], data: vec![0.0; self.params] };
        Ok(Box::new(SyntheticTrainer { params: Parameters::new(vec![t]).map_err(|e| e.to_string())? }))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// A federation run from this process: the coordinator as tasks of this
/// tokio runtime, and one party node per name, either as tasks of the same
/// runtime or in `party_processes` child processes, all over loopback
/// mutual TLS.
struct Federation {
    dir: tempfile::TempDir,
    names: Vec<String>,
    party_processes: usize,
    /// Rounds of distributed-DP noise each party draws ahead.
    noise_rounds_ahead: usize,
    /// Serve Prometheus metrics from the coordinator and the in-process
    /// parties, and scrape them every 200 ms while the job runs.
    metrics: bool,
}

/// What a finished benchmark job reports.
struct FederationRun {
    status: JobStatus,
    /// Bytes the parties sent and received.
    bytes: u64,
    /// The coordinator process's resident memory before any party connected.
    rss_before: u64,
    /// Its largest resident memory while the parties were connected and the job ran.
    rss_peak: u64,
    /// Successful `/metrics` scrapes while the job ran (0 with metrics off).
    scrapes: u64,
}

/// A figure of this process from `/proc/self/status` (`VmRSS`: resident
/// memory now; `VmHWM`: its high-water mark), in bytes (Linux; 0 elsewhere).
fn memory(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)
                    .and_then(|v| v.trim_start_matches(':').trim().trim_end_matches(" kB").parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb * 1024)
}

/// Resets the resident-memory high-water mark (Linux: `clear_refs` 5).
fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A party node's configuration for the benchmark.
fn party_config(
    url: &str,
    pki: &PkiDir,
    name: &str,
    dataset: &str,
    source: DatasetSource,
    ahead: usize,
) -> PartyConfig {
    PartyConfig {
        coordinator: url.to_owned(),
        server_name: "localhost".into(),
        relay: None,
        ca: pki.ca_cert(),
        cert: pki.party_cert(name),
        key: pki.party_key(name),
        revocation_list: None,
        ledger: None,
        audit_log: None,
        datasets: [(dataset.to_string(), source)].into(),
        policy: Policy { aggregation: vec!["none".into(), "secagg".into(), "he".into()], ..Policy::default() },
        reconnect: Reconnect::default(),
        limits: Limits::default(),
        serve: Default::default(),
        cloud: Default::default(),
        fault: Default::default(),
        models: Default::default(),
        metrics: Default::default(),
        training: confide_party::config::TrainingSettings { dp_noise_rounds_ahead: ahead, ..Default::default() },
        warnings: Vec::new(),
    }
}

impl Federation {
    fn new(names: Vec<String>, party_processes: usize) -> Result<Self, String> {
        Ok(Federation {
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
            names,
            party_processes,
            noise_rounds_ahead: 1,
            metrics: false,
        })
    }

    /// Runs `spec` (TOML) to its end with parties built by `factory`, each
    /// party's data set `dataset` read from `data(name)`. Child processes run
    /// synthetic parties of `params` values.
    async fn run(
        &self,
        spec: String,
        factory: Arc<dyn TrainerFactory>,
        dataset: &str,
        data: impl Fn(&str) -> DatasetSource,
        params: usize,
    ) -> Result<FederationRun, String> {
        let pki = PkiDir::new(self.dir.path().join("pki"));
        pki.init("bench", &self.names, &[]).map_err(|e| e.to_string())?;
        let coordinator = server::start(CoordinatorConfig {
            listen: "127.0.0.1:0".parse().map_err(|_| "addr")?,
            data_dir: self.dir.path().join("coordinator"),
            pki: pki.root().to_path_buf(),
            limits: Limits::default(),
            models: Default::default(),
            metrics: self.metrics_config(),
        })
        .await
        .map_err(|e| e.to_string())?;
        let url = format!("https://{}", coordinator.local_addr);
        let mut scraped: Vec<std::net::SocketAddr> = coordinator.metrics_addr.into_iter().collect();
        // What the parties cost the coordinator, connections and job data
        // together, from before the first one connects.
        reset_peak_memory();
        let rss_before = memory("VmRSS");
        let mut stats: Vec<Arc<NodeStats>> = Vec::new();
        let mut tasks = Vec::new();
        let mut children = Vec::new();
        if self.party_processes == 0 {
            for n in &self.names {
                let mut cfg = party_config(&url, &pki, n, dataset, data(n), self.noise_rounds_ahead);
                cfg.metrics = self.metrics_config();
                let node = Arc::new(PartyNode::new(cfg, factory.clone()));
                stats.push(node.stats());
                scraped.extend(node.start_metrics().await.map_err(|e| e.to_string())?);
                tasks.push(tokio::spawn(async move { node.run().await }));
            }
        } else {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let per = self.names.len().div_ceil(self.party_processes);
            for slice in self.names.chunks(per.max(1)) {
                let child = std::process::Command::new(&exe)
                    .args([
                        "serve-parties",
                        "--url",
                        &url,
                        "--params",
                        &params.to_string(),
                        "--names",
                        &slice.join(","),
                        "--noise-rounds-ahead",
                        &self.noise_rounds_ahead.to_string(),
                    ])
                    .arg("--pki")
                    .arg(pki.root())
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("cannot start party processes: {e}"))?;
                children.push(child);
            }
        }
        let scrapes = Arc::new(Scrapes::default());
        if !scraped.is_empty() {
            tasks.push(tokio::spawn(scrape_every_second(scraped, scrapes.clone())));
        }
        let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
        let id = ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
        let mut admin = AdminServiceClient::new(connect(&id).await.map_err(|e| e.to_string())?);
        let job = admin
            .submit_job(pb::SubmitJobRequest { spec_toml: spec, file_name: "bench".into(), grant: None })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner()
            .job_id;
        let status = loop {
            let s = admin
                .get_job(pb::JobRef { job_id: job.clone(), round: None })
                .await
                .map_err(|s| s.message().to_string())?;
            let st = JobStatus::try_from(s.into_inner()).map_err(|e| e.to_string())?;
            if st.state.is_terminal() {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let rss_peak = memory("VmHWM");
        for t in tasks {
            t.abort();
        }
        let mut bytes: u64 =
            stats.iter().map(|s| s.bytes_sent.load(Ordering::Relaxed) + s.bytes_received.load(Ordering::Relaxed)).sum();
        for mut child in children {
            // Closing its standard input ends the child, which reports its traffic.
            drop(child.stdin.take());
            let out = child.wait_with_output().map_err(|e| e.to_string())?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            bytes += v["bytes"].as_u64().unwrap_or(0);
        }
        coordinator.stop().await;
        if status.state.as_str() != "succeeded" {
            return Err(format!(
                "benchmark job {}: {}",
                status.state.as_str(),
                status.error.clone().unwrap_or_default()
            ));
        }
        if let Some(f) = scrapes.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(f);
        }
        let scrapes = scrapes.ok.load(Ordering::Relaxed);
        Ok(FederationRun { status, bytes, rss_before, rss_peak, scrapes })
    }
}

impl Federation {
    fn metrics_config(&self) -> confide_proto::telemetry::MetricsConfig {
        confide_proto::telemetry::MetricsConfig {
            listen: self.metrics.then(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
            allow_hosts: Vec::new(),
        }
    }
}

/// What the scraper did: successful scrapes, and the first failure.
#[derive(Default)]
struct Scrapes {
    ok: std::sync::atomic::AtomicU64,
    failed: std::sync::Mutex<Option<String>>,
}

/// Scrapes every `/metrics` address every 200 ms (Prometheus's default
/// interval is 15 s: 75 times as often, so that every round meets scrapes)
/// until aborted. A failure is
/// kept and fails the run, so that "metrics on" never silently measures
/// nothing.
async fn scrape_every_second(addrs: Vec<std::net::SocketAddr>, log: Arc<Scrapes>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        for a in &addrs {
            let body = async {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await?;
                let mut out = Vec::new();
                s.read_to_end(&mut out).await?;
                Ok::<_, std::io::Error>(out)
            };
            let failure = match body.await {
                Ok(out) if out.starts_with(b"HTTP/1.1 200") => None,
                Ok(out) => Some(format!("scraping {a}: {}", String::from_utf8_lossy(&out[..out.len().min(200)]))),
                Err(e) => Some(format!("scraping {a}: {e}")),
            };
            match failure {
                None => {
                    log.ok.fetch_add(1, Ordering::Relaxed);
                }
                Some(f) => {
                    log.failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(f);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The synthetic parties' data set: their trainer reads no rows, and the
/// width a DP job needs declared is nominal.
fn synthetic_source() -> DatasetSource {
    DatasetSource { features: Some(1), ..DatasetSource::csv(PathBuf::from("unused")) }
}

/// `serve-parties`: synthetic party nodes until standard input closes.
async fn serve_parties(
    url: String,
    pki: PathBuf,
    params: usize,
    names: Vec<String>,
    ahead: usize,
) -> Result<(), String> {
    let pki = PkiDir::new(pki);
    let factory: Arc<dyn TrainerFactory> = Arc::new(SyntheticFactory { params });
    let mut stats = Vec::new();
    for n in &names {
        let cfg = party_config(&url, &pki, n, "synthetic", synthetic_source(), ahead);
        let node = PartyNode::new(cfg, factory.clone());
        stats.push(node.stats());
        tokio::spawn(async move { node.run().await });
    }
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await
    .map_err(|e| e.to_string())?;
    let bytes: u64 =
        stats.iter().map(|s| s.bytes_sent.load(Ordering::Relaxed) + s.bytes_received.load(Ordering::Relaxed)).sum();
    println!("{}", serde_json::json!({ "bytes": bytes }));
    Ok(())
}

/// Medians of round metrics over rounds `1..=rounds` (the last round, which
/// also evaluates, is left out).
fn round_median(status: &JobStatus, rounds: u32, key: &str) -> f64 {
    median(status.history.iter().filter(|r| r.round <= rounds).filter_map(|r| r.metrics.get(key).copied()).collect())
}

fn privacy_table(privacy: &str) -> Result<&'static str, String> {
    match privacy {
        "none" => Ok(""),
        "secagg" => Ok("[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\n"),
        // A key budget of 2^24 coefficients: one key for 16 rounds of 10^6 values.
        "he" => Ok("[aggregation]\nprotocol = \"he\"\n[aggregation.he]\nmax_examples = 1000\nkey_budget_log2 = 24\n"),
        // Party-level DP with distributed noise under secagg.
        "secagg-dp" => Ok("[aggregation]\nprotocol = \"secagg\"\n[dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\n\
                           update_clip = 1.0\n"),
        // The same at 24-bit words (packed so on the wire): at 10^6 values
        // and ten parties the rounding's slack costs the noise almost
        // nothing at this width.
        "secagg-dp24" => Ok("[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nbits = 24\n[dp]\n\
                             level = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 1.0\n"),
        other => Err(format!("--privacy {other}: unknown (none, secagg, secagg-dp, secagg-dp24, he)")),
    }
}

/// What one party spends drawing its distributed-DP noise for a model of
/// `params` values ahead of a round of `parties` (the job's spec as the
/// round benchmark runs it): milliseconds, median of three.
fn dp_presample_ms(spec: &str, params: usize) -> Result<f64, String> {
    use std::time::Instant;
    let spec = load_spec(spec, "bench")?;
    let dp = spec.dp.as_ref().ok_or("no [dp]")?;
    let cfg = dp.ddg_config(params).ok_or("no distributed noise")?;
    let ddg = confide_dp::ddg::Ddg::new(cfg).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let noise = ddg.sample_noise().map_err(|e| e.to_string())?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(noise);
    }
    Ok(median(times))
}

async fn bench_round(
    parties: usize,
    params: usize,
    privacy: &str,
    rounds: u32,
    party_processes: usize,
    metrics: bool,
) -> Result<serde_json::Value, String> {
    let privacy_table = privacy_table(privacy)?;
    let names: Vec<String> = (0..parties).map(|i| format!("p{i:03}")).collect();
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let spec = format!(
        "name = \"bench\"\nkind = \"train\"\nrounds = {}\n[parties]\nnames = [{}]\ndataset = \"synthetic\"\n\
         [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n[evaluation]\nevery = 100000\n\
         [timeouts]\nrecruit_secs = 120\nround_secs = 600\n{privacy_table}",
        rounds + 1,
        quoted.join(",")
    );
    let presample = if privacy.starts_with("secagg-dp") { Some(dp_presample_ms(&spec, params)?) } else { None };
    let mut fed = Federation::new(names, party_processes)?;
    fed.metrics = metrics;
    // Every measured round's noise is drawn before the first: the target
    // excludes it (it does not depend on the data), and ten parties sharing
    // two cores could not hide it between rounds.
    fed.noise_rounds_ahead = rounds as usize + 1;
    let factory = Arc::new(SyntheticFactory { params });
    let run = fed.run(spec, factory, "synthetic", |_| synthetic_source(), params).await?;
    let metric = |k: &str| round_median(&run.status, rounds, k);
    // Process CPU per round as the mean over the measured rounds: per-round
    // values have the kernel's 10 ms tick resolution, their sum is exact.
    let cpu: Vec<f64> = run
        .status
        .history
        .iter()
        .filter(|r| r.round <= rounds)
        .filter_map(|r| r.metrics.get("process_cpu_ms").copied())
        .collect();
    let cpu_per_round = if cpu.is_empty() { f64::NAN } else { cpu.iter().sum::<f64>() / cpu.len() as f64 };
    // The same after the first measured round (which draws every round's
    // distributed-DP noise), with the round times of those rounds: how many
    // of the machine's cores the round keeps busy.
    let (later_cpu, later_ms) = run
        .status
        .history
        .iter()
        .filter(|r| (2..=rounds).contains(&r.round))
        .filter_map(|r| Some((*r.metrics.get("process_cpu_ms")?, *r.metrics.get("round_ms")?)))
        .fold((0.0, 0.0), |(c, m), (rc, rm)| (c + rc, m + rm));
    let later_rounds = rounds.saturating_sub(1).max(1) as f64;
    // Where the round's time goes: each stage's median duration.
    let stages: serde_json::Map<String, serde_json::Value> = run
        .status
        .history
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter(|k| k.starts_with("stage_"))
        .map(|k| (k.trim_start_matches("stage_").to_string(), metric(k)))
        .filter(|(_, ms)| ms.is_finite())
        .map(|(k, ms)| (k, ms.into()))
        .collect();
    Ok(serde_json::json!({
        "bench": "round",
        "privacy": privacy,
        "metrics": if metrics { "on" } else { "off" },
        "metrics_scrapes": run.scrapes,
        "parties": parties,
        "params": params,
        "rounds": rounds,
        "round_ms_median": metric("round_ms"),
        // Each measured round's time (of the median repetition), so that a
        // slow first round (key generation, drawing randomness ahead) shows.
        "round_ms_by_round": run
            .status
            .history
            .iter()
            .filter(|r| r.round <= rounds)
            .filter_map(|r| r.metrics.get("round_ms").map(|ms| ms.round()))
            .collect::<Vec<f64>>(),
        "coordinator_ms_median": metric("coordinator_ms"),
        "party_ms_median": metric("fit_ms"),
        "stage_ms_median": stages,
        // Distributed DP: each party's noise for one round. Every round's is
        // drawn with the first round's training (one slow round of those
        // measured, which their median does not follow), so the median
        // round time excludes it.
        "dp_presample_ms": presample,
        "bytes_per_party": run.bytes / (parties as u64 * u64::from(rounds + 1)),
        // With the parties in other processes, the coordinator process's
        // own CPU time and the memory the job added to it, per party.
        // The whole process's CPU per round (rounds 2 on; with the parties
        // in this process, theirs too) and the cores it kept busy.
        "process_cpu_ms_per_round": later_cpu / later_rounds,
        "cores_busy": if later_ms > 0.0 { later_cpu / later_ms } else { f64::NAN },
        "coordinator_process_cpu_ms_per_round": if party_processes > 0 { serde_json::json!(cpu_per_round) } else { serde_json::Value::Null },
        "coordinator_rss_mb_before": run.rss_before as f64 / 1e6,
        "coordinator_rss_mb_peak": run.rss_peak as f64 / 1e6,
        "coordinator_memory_per_party_kb": if party_processes > 0 {
            serde_json::json!(run.rss_peak.saturating_sub(run.rss_before) as f64 / 1e3 / parties as f64)
        } else {
            serde_json::Value::Null
        },
        "topology": if party_processes > 0 {
            format!("coordinator in this process, parties in {party_processes} child processes; gRPC over loopback mutual TLS 1.3")
        } else {
            "coordinator and parties as tasks of one tokio runtime; gRPC over loopback mutual TLS 1.3".to_string()
        },
    }))
}

/// One run of `round` in a child process of this benchmark (one
/// configuration, one repetition), its JSON object.
fn bench_round_in_child(
    parties: usize,
    params: usize,
    privacy: &str,
    rounds: u32,
    party_processes: usize,
    metrics: bool,
) -> Result<serde_json::Value, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .args(["round", "--json", "--repeat", "1", "--privacy", privacy])
        .args(["--metrics", if metrics { "on" } else { "off" }])
        .args(["--parties", &parties.to_string(), "--params", &params.to_string(), "--rounds", &rounds.to_string()])
        .args(["--party-processes", &party_processes.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start a benchmark process: {e}"))?;
    if !out.status.success() {
        return Err(format!("the benchmark process failed ({})", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().ok_or("the benchmark process printed nothing")?;
    serde_json::from_str(line).map_err(|e| format!("the benchmark process printed no JSON: {e}"))
}

/// One configuration's repetitions as one object: the repetition with the
/// median round time, with the medians across repetitions of the headline
/// figures and every repetition's round time.
fn combine_runs(mut runs: Vec<serde_json::Value>) -> Option<serde_json::Value> {
    if runs.is_empty() {
        return None;
    }
    let figure =
        |runs: &[serde_json::Value], k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let round_ms = figure(&runs, "round_ms_median");
    let heads = [
        "round_ms_median",
        "coordinator_ms_median",
        "party_ms_median",
        "coordinator_process_cpu_ms_per_round",
        "process_cpu_ms_per_round",
        "cores_busy",
        "coordinator_memory_per_party_kb",
        "coordinator_rss_mb_peak",
    ];
    let medians: Vec<(&str, Option<f64>)> =
        heads.iter().map(|k| (*k, Some(figure(&runs, k)).filter(|v| !v.is_empty()).map(median))).collect();
    let repetitions = runs.len();
    runs.sort_by(|a, b| {
        a["round_ms_median"].as_f64().unwrap_or(0.0).total_cmp(&b["round_ms_median"].as_f64().unwrap_or(0.0))
    });
    let mut v = runs.swap_remove(repetitions / 2);
    for (k, m) in medians {
        if let Some(m) = m {
            v[k] = serde_json::json!(m);
        }
    }
    v["repetitions"] = serde_json::json!(repetitions);
    v["round_ms_runs"] = serde_json::json!(round_ms);
    Some(v)
}

fn repo_root() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load_spec(text: &str, file: &str) -> Result<JobSpec, String> {
    JobSpec::parse(text, file, &Limits::default()).map_err(|e| e.to_string())
}

/// The demo's MLP spec (examples/jobs/breast-cancer-mlp.toml).
fn demo_spec() -> Result<JobSpec, String> {
    let path = repo_root().join("examples/jobs/breast-cancer-mlp.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    load_spec(&text, &path.display().to_string())
}

/// The CNN on the UCI digits, as `confide-bench train` measures it.
fn digits_cnn_spec() -> Result<JobSpec, String> {
    load_spec(
        "name = \"digits-cnn\"\nkind = \"train\"\n[parties]\nnames = [\"a\"]\ndataset = \"digits\"\n\
         [model]\nkind = \"cnn\"\nclasses = 10\nchannels = [16, 32]\nimage = [1, 8, 8]\n\
         [training]\nbatch_size = 32\nlearning_rate = 0.05\nmomentum = 0.9\n",
        "digits-cnn",
    )
}

/// Local training throughput: `epochs` epochs of `spec`'s model over `file`.
fn bench_steps(what: &str, spec: &JobSpec, file: &str, header: bool, epochs: u32) -> Result<serde_json::Value, String> {
    use confide_algorithms::data::Dataset;
    use confide_party::trainers::BuiltinTrainers;
    let path = repo_root().join("examples/data").join(file);
    let rows = Dataset::load_csv(&path, &CsvOptions { header, label_column: -1 }).map_err(|e| e.to_string())?;
    let n = rows.len();
    let mut trainer =
        BuiltinTrainers::new(Default::default(), 1).build_from(spec, rows, Dataset::default(), "bench")?;
    let mut train = spec.training.clone();
    train.local_epochs = 1;
    // One warm-up epoch (allocator, libtorch's kernels), then the measured ones.
    trainer.fit(&FitConfig { round: 1, train: train.clone() }).map_err(|e| e.to_string())?;
    train.local_epochs = epochs.max(1);
    let started = std::time::Instant::now();
    trainer.fit(&FitConfig { round: 2, train: train.clone() }).map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    let steps = n.div_ceil(train.batch_size) as f64 * f64::from(train.local_epochs);
    Ok(serde_json::json!({
        "bench": "train_steps",
        "model": what,
        "params": trainer.parameters().map_err(|e| e.to_string())?.num_values(),
        "rows": n,
        "batch_size": train.batch_size,
        "optimizer": format!("{:?}", train.optimizer).to_lowercase(),
        "steps_per_sec": steps / secs,
        "examples_per_sec": n as f64 * f64::from(train.local_epochs) / secs,
        "threads": 1,
    }))
}

/// The demo's federation (3 hospitals, breast cancer 5:3:2, the MLP) for
/// `rounds` rounds: per-round framework overhead = round time − the slowest
/// party's local training time.
async fn bench_train_rounds(privacy: &str, rounds: u32) -> Result<serde_json::Value, String> {
    use confide_algorithms::data::Dataset;
    use confide_party::trainers::BuiltinTrainers;
    let names: Vec<String> = ["hospital-a", "hospital-b", "hospital-c"].map(String::from).to_vec();
    let fed = Federation::new(names.clone(), 0)?;
    let path = repo_root().join("examples/data/breast_cancer.csv");
    let rows = Dataset::load_csv(&path, &CsvOptions { header: true, label_column: -1 }).map_err(|e| e.to_string())?;
    let (shuffled, _) = rows.shuffle_split(0.0, 7);
    let bounds = [0, shuffled.len() / 2, shuffled.len() * 8 / 10, shuffled.len()];
    for (i, n) in names.iter().enumerate() {
        let part = shuffled.select(&(bounds[i]..bounds[i + 1]).collect::<Vec<_>>());
        let file = fed.dir.path().join(format!("{n}.csv"));
        std::fs::write(&file, part.to_csv()).map_err(|e| e.to_string())?;
    }
    let mut spec = demo_spec()?;
    spec.rounds = rounds + 1;
    spec.evaluation.every = 100_000;
    spec.aggregation = match privacy {
        "none" => AggregationSpec::default(),
        "secagg" => AggregationSpec { protocol: "secagg".into(), settings: toml::toml! { max_examples = 1000 } },
        "he" => AggregationSpec { protocol: "he".into(), settings: toml::toml! { max_examples = 1000 } },
        other => return Err(format!("--privacy {other}: unknown (none, secagg, he)")),
    };
    let text = spec.to_toml();
    let dir = fed.dir.path().to_path_buf();
    let factory = Arc::new(BuiltinTrainers::new(Default::default(), 1));
    let source = |n: &str| DatasetSource {
        features: Some(rows.num_features),
        ..DatasetSource::csv(dir.join(format!("{n}.csv")))
    };
    let run = fed.run(text, factory, &spec.parties.dataset, source, 0).await?;
    let per_round: Vec<f64> = run
        .status
        .history
        .iter()
        .filter(|r| r.round <= rounds)
        .filter_map(|r| Some(r.metrics.get("round_ms")? - r.metrics.get("train_ms_max")?))
        .collect();
    Ok(serde_json::json!({
        "bench": "train_round_overhead",
        "model": "mlp (demo)",
        "privacy": privacy,
        "parties": names.len(),
        "rounds": rounds,
        "round_ms_median": round_median(&run.status, rounds, "round_ms"),
        "slowest_train_ms_median": round_median(&run.status, rounds, "train_ms_max"),
        "overhead_ms_median": median(per_round),
        "topology": "coordinator and parties as tasks of one tokio runtime; gRPC over loopback mutual TLS 1.3",
    }))
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Logs only when asked (CONFIDE_LOG=debug): timelines for profiling.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("CONFIDE_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::ServeParties { url, pki, params, names, noise_rounds_ahead } => {
            if let Err(e) = serve_parties(url, pki, params, names, noise_rounds_ahead).await {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        Command::Round { parties, params, privacy, rounds, repeat, party_processes, metrics, json } => {
            let mut failed = false;
            let mut metric_modes: Vec<bool> = Vec::new();
            for m in &metrics {
                match m.as_str() {
                    "off" => metric_modes.push(false),
                    "on" => metric_modes.push(true),
                    other => {
                        eprintln!("error: --metrics {other}: unknown (off, on)");
                        std::process::exit(2);
                    }
                }
            }
            let mut configs: Vec<(usize, usize, String, bool)> = Vec::new();
            for &n in &parties {
                for &p in &params {
                    for m in &privacy {
                        for &on in &metric_modes {
                            configs.push((n, p, m.clone(), on));
                        }
                    }
                }
            }
            let mut runs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); configs.len()];
            for _ in 0..repeat.max(1) {
                // Every configuration back to back in each repetition, so
                // ratios compare figures measured in one run.
                for (i, (n, p, mode, on)) in configs.iter().enumerate() {
                    // With the parties in child processes, each run gets a
                    // fresh coordinator process too: memory an earlier run
                    // freed but the allocator kept would otherwise hide the
                    // next run's growth.
                    let run = if party_processes > 0 && configs.len() * repeat.max(1) > 1 {
                        bench_round_in_child(*n, *p, mode, rounds.max(1), party_processes, *on)
                    } else {
                        bench_round(*n, *p, mode, rounds.max(1), party_processes, *on).await
                    };
                    match run {
                        Ok(v) => runs[i].push(v),
                        Err(e) => {
                            eprintln!("error: parties={n} params={p} privacy={mode} metrics={on}: {e}");
                            failed = true;
                        }
                    }
                }
            }
            let combined: Vec<Option<serde_json::Value>> = runs.into_iter().map(combine_runs).collect();
            for (i, (n, p, mode, on)) in configs.iter().enumerate() {
                let Some(mut v) = combined[i].clone() else { continue };
                let field = |j: usize, k: &str| combined[j].as_ref().and_then(|c| c[k].as_f64());
                // The plaintext run of the same size (and metrics setting),
                // and the smallest party count of the same size and mode,
                // for ratios.
                if mode != "none"
                    && let Some(j) = configs.iter().position(|c| c.0 == *n && c.1 == *p && c.2 == "none" && c.3 == *on)
                    && let (Some(base), Some(ms)) = (field(j, "round_ms_median"), v["round_ms_median"].as_f64())
                {
                    v["overhead_vs_plain"] = serde_json::json!(ms / base);
                    // Each repetition's ratio to the plaintext run measured
                    // just before it (the same repetition): drift of a shared
                    // machine over the whole run cancels in each pair.
                    let runs = |c: &Option<serde_json::Value>| -> Vec<f64> {
                        c.as_ref()
                            .and_then(|c| c["round_ms_runs"].as_array().cloned())
                            .unwrap_or_default()
                            .iter()
                            .filter_map(serde_json::Value::as_f64)
                            .collect()
                    };
                    let (plain, secure) = (runs(&combined[j]), runs(&combined[i]));
                    if plain.len() == secure.len() && !plain.is_empty() {
                        let paired: Vec<f64> = secure.iter().zip(&plain).map(|(s, p)| s / p).collect();
                        v["overhead_vs_plain_paired_median"] = serde_json::json!(median(paired.clone()));
                        v["overhead_vs_plain_by_repetition"] = serde_json::json!(paired);
                    }
                }
                if *on
                    && let Some(j) = configs.iter().position(|c| c.0 == *n && c.1 == *p && c.2 == *mode && !c.3)
                    && let (Some(base), Some(ms)) = (field(j, "round_ms_median"), v["round_ms_median"].as_f64())
                {
                    v["round_ms_vs_metrics_off"] = serde_json::json!(ms / base);
                }
                let smallest = parties.iter().min().copied().unwrap_or(*n);
                if *n != smallest
                    && let Some(j) =
                        configs.iter().position(|c| c.0 == smallest && c.1 == *p && c.2 == *mode && c.3 == *on)
                {
                    for k in ["round_ms_median", "coordinator_ms_median", "coordinator_process_cpu_ms_per_round"] {
                        if let (Some(base), Some(x)) = (field(j, k), v[k].as_f64()) {
                            v[format!("{k}_vs_{smallest}_parties")] = serde_json::json!(x / base);
                        }
                    }
                }
                if json { println!("{v}") } else { println!("{v:#}") }
            }
            std::process::exit(i32::from(failed));
        }
        Command::Train { epochs, rounds, privacy } => {
            let mut results = Vec::new();
            match demo_spec() {
                Ok(spec) => results.push(bench_steps("mlp (demo)", &spec, "breast_cancer.csv", true, epochs)),
                Err(e) => results.push(Err(e)),
            }
            match digits_cnn_spec() {
                Ok(spec) => results.push(bench_steps("cnn (digits)", &spec, "digits.csv.gz", false, epochs)),
                Err(e) => results.push(Err(e)),
            }
            for mode in &privacy {
                results.push(bench_train_rounds(mode, rounds.max(1)).await);
            }
            let mut failed = false;
            for r in results {
                match r {
                    Ok(v) => println!("{v}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed = true;
                    }
                }
            }
            std::process::exit(i32::from(failed));
        }
        Command::Dp { coordinates, sigma, opendp_samples, steps, repeat } => {
            match bench_dp(coordinates, &sigma, opendp_samples, steps, repeat.max(1)) {
                Ok(lines) => lines.iter().for_each(|v| println!("{v}")),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::He { parties, values, bits, repeat } => {
            let mut failed = false;
            for n in parties {
                match he_bench::bench_he(n.max(3), values.max(1), bits.clamp(1, 32), repeat.max(1)) {
                    Ok(v) => println!("{v}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed = true;
                    }
                }
            }
            std::process::exit(i32::from(failed));
        }
        Command::DpSgd { steps, repeat } => match bench_dp_sgd(steps.max(1), repeat.max(1)) {
            Ok(lines) => lines.iter().for_each(|v| println!("{v}")),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
        Command::Serve { clients, rows_per_request, seconds } => {
            match serve_bench(&clients, &rows_per_request, seconds).await {
                Ok(lines) => {
                    for l in lines {
                        println!("{l}");
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Joint { epochs, latency, clients, seconds } => {
            let data = repo_root().join("examples/data/digits.csv.gz");
            let result = if latency {
                joint_bench::bench_joint_latency(&data, epochs.max(1), clients.max(1), seconds.max(0.1)).await
            } else {
                joint_bench::bench_joint(&data, epochs.max(1))
            };
            match result {
                Ok(lines) => lines.iter().for_each(|v| println!("{v}")),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Incremental { batches, poll_secs } => {
            let data = repo_root().join("examples/data/digits.csv.gz");
            match incremental_bench::bench_incremental(&data, batches.max(1), poll_secs).await {
                Ok(lines) => lines.iter().for_each(|v| println!("{v}")),
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Load { addr, service, data, header, rows_per_request, clients, seconds } => {
            let ds = match confide_algorithms::data::Dataset::load_csv(&data, &CsvOptions { header, label_column: -1 })
            {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            // Every row of the file in turn, so hard examples come too.
            let bodies = confide_bench::loadgen::bodies(&ds.features, ds.num_features, rows_per_request.max(1));
            let path = format!("/v1/services/{service}/predict");
            let report = confide_bench::loadgen::run_bodies(
                addr,
                &path,
                bodies,
                None,
                rows_per_request.max(1),
                clients,
                Duration::from_secs_f64(seconds.max(0.1)),
            )
            .await;
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            std::process::exit(i32::from(report.failures > 0));
        }
        Command::SecaggScaling { parties, params } => {
            let mut failed = false;
            for n in parties {
                match secagg_scaling(n.max(3), params.max(1)) {
                    Ok(v) => println!("{v}"),
                    Err(e) => {
                        eprintln!("error: parties={n}: {e}");
                        failed = true;
                    }
                }
            }
            std::process::exit(i32::from(failed));
        }
    }
}

fn median_ms(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// `confide-bench dp`: noise and accountant timings.
/// Time per step of DP-SGD (`fit_private`) and of ordinary training
/// (`fit`) on the same model and rows, alternating, medians of `repeat`.
fn bench_dp_sgd(steps: u64, repeat: usize) -> Result<Vec<serde_json::Value>, String> {
    use confide_algorithms::data::{CsvOptions, Dataset};
    use confide_algorithms::trainer::apply_feature_stats;
    use confide_algorithms::{DpSgdPlan, FitConfig, ModelConfig, TrainConfig, Trainer};
    use std::time::Instant;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data");
    let load = |file: &str, header: bool| {
        Dataset::load_csv(&root.join(file), &CsvOptions { header, label_column: -1 }).map_err(|e| e.to_string())
    };
    let (bc, digits) = (load("breast_cancer.csv", true)?, load("digits.csv.gz", false)?);
    confide_party::torch::set_threads(1);
    let cases: Vec<(&str, ModelConfig, Dataset, usize, bool)> = vec![
        ("mlp_breast_cancer", ModelConfig::mlp(2, vec![32, 16]), bc.clone(), 16, true),
        ("cnn_digits", ModelConfig::cnn(10, vec![16, 32], [1, 8, 8]), digits, 32, true),
        ("logreg_rust_breast_cancer", ModelConfig::logistic_regression(2), bc, 16, false),
    ];
    let mut lines = Vec::new();
    for (name, model, rows, batch, torch) in cases {
        let n = rows.len();
        let mut t: Box<dyn Trainer> = if torch {
            Box::new(
                confide_party::torch::TorchTrainer::new(&model, None, rows.clone(), Dataset::default(), 1, 0)
                    .map_err(|e| e.to_string())?,
            )
        } else {
            Box::new(
                confide_algorithms::LogisticRegression::new(2, rows.clone(), Dataset::default(), 1, 0)
                    .map_err(|e| e.to_string())?,
            )
        };
        let mut p = t.parameters().map_err(|e| e.to_string())?;
        apply_feature_stats(&mut p, &rows.feature_stats()).map_err(|e| e.to_string())?;
        t.set_parameters(&p).map_err(|e| e.to_string())?;
        // Ordinary training: whole epochs of `batch`-row steps, at least `steps`.
        let per_epoch = n.div_ceil(batch) as u64;
        let epochs = steps.div_ceil(per_epoch).max(1);
        let train = TrainConfig {
            local_epochs: epochs as u32,
            batch_size: batch,
            learning_rate: 0.01,
            ..TrainConfig::default()
        };
        let config = FitConfig { round: 1, train };
        let plan = DpSgdPlan {
            max_grad_norm: 1.0,
            noise_multiplier: 1.0,
            sampling_rate: batch as f64 / n as f64,
            expected_batch_size: batch,
            steps_per_round: steps,
            // Rounds without end: every timed round keeps its reserve.
            rounds: u32::MAX,
        };
        let (mut plain, mut private) = (Vec::new(), Vec::new());
        // CPU time too. The trainer's thread: what a step costs on the
        // training path. The process's (every thread, ended ones
        // included): the DP-SGD steps' whole cost, their noise included,
        // which a thread of its own draws ahead at the lowest priority,
        // here while the ordinary fit runs (in a federation, while the
        // party waits between rounds).
        let (mut plain_cpu, mut private_cpu, mut private_total_cpu) = (Vec::new(), Vec::new(), Vec::new());
        let clock_ms = |id| {
            let t = rustix::time::clock_gettime(id);
            t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
        };
        let (process_ms, thread_ms) =
            (|| clock_ms(rustix::time::ClockId::ProcessCPUTime), || clock_ms(rustix::time::ClockId::ThreadCPUTime));
        // A first DP-SGD round, untimed, as a federation's first round:
        // its noise reserve is started then, kept for the next.
        t.set_parameters(&p).map_err(|e| e.to_string())?;
        t.fit_private(&config, &plan).map_err(|e| e.to_string())?;
        let plain_steps = (epochs * per_epoch) as f64;
        for _ in 0..repeat {
            t.set_parameters(&p).map_err(|e| e.to_string())?;
            let (process_start, thread_at_start, start) = (process_ms(), thread_ms(), Instant::now());
            t.fit(&config).map_err(|e| e.to_string())?;
            plain.push(start.elapsed().as_secs_f64() * 1e3 / plain_steps);
            plain_cpu.push((thread_ms() - thread_at_start) / plain_steps);
            t.set_parameters(&p).map_err(|e| e.to_string())?;
            let (thread_start, start) = (thread_ms(), Instant::now());
            // The trainer's own CPU before the DP-SGD fit (the ordinary fit
            // and setting the parameters) is not the DP-SGD steps'.
            let thread_before_private = thread_start - thread_at_start;
            t.fit_private(&config, &plan).map_err(|e| e.to_string())?;
            private.push(start.elapsed().as_secs_f64() * 1e3 / steps as f64);
            private_cpu.push((thread_ms() - thread_start) / steps as f64);
            private_total_cpu.push((process_ms() - process_start - thread_before_private) / steps as f64);
        }
        let (plain, private) = (median_ms(plain), median_ms(private));
        let (plain_cpu, private_cpu, private_total_cpu) =
            (median_ms(plain_cpu), median_ms(private_cpu), median_ms(private_total_cpu));
        lines.push(serde_json::json!({
            "bench": "dp_sgd_step",
            "model": name,
            "rows": n,
            "batch": batch,
            "trainable_values": p.num_values() - 2 * rows.num_features,
            "plain_ms_per_step": plain,
            "dp_sgd_ms_per_step": private,
            "ratio": private / plain,
            "plain_cpu_ms_per_step": plain_cpu,
            // The whole process's CPU, the noise thread's drawing included.
            "dp_sgd_cpu_ms_per_step": private_total_cpu,
            "cpu_ratio": private_total_cpu / plain_cpu,
            // The trainer's thread alone: the training path's CPU, its
            // noise drawn ahead.
            "dp_sgd_trainer_cpu_ms_per_step": private_cpu,
            "trainer_cpu_ratio": private_cpu / plain_cpu,
            "runs": repeat,
        }));
    }
    Ok(lines)
}

fn bench_dp(
    coordinates: usize,
    sigmas: &[u32],
    opendp_samples: usize,
    steps: u64,
    repeat: usize,
) -> Result<Vec<serde_json::Value>, String> {
    use confide_dp::rdp::{DpEvent, RdpAccountant};
    use confide_dp::sampler::DiscreteGaussian;
    use std::time::Instant;
    let mut lines = Vec::new();
    for &sigma in sigmas {
        let dg = DiscreteGaussian::with_sigma(sigma).map_err(|e| e.to_string())?;
        let mut out = vec![0i64; coordinates];
        let mut runs = Vec::new();
        for _ in 0..repeat {
            let start = Instant::now();
            dg.fill(&mut out).map_err(|e| e.to_string())?;
            runs.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let ours = median_ms(runs);
        // The same on one thread: OpenDP's sampler below runs on one.
        let mut one = Vec::new();
        let mut rng = confide_dp::sampler::os_seeded_rng().map_err(|e| e.to_string())?;
        for _ in 0..repeat {
            let start = Instant::now();
            dg.fill_from(&mut out, &mut rng);
            one.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let one_thread = median_ms(one);
        // OpenDP's exact sampler (big rationals), timed on a sample and
        // scaled to the same number of coordinates, in this same run.
        let start = Instant::now();
        for _ in 0..opendp_samples {
            opendp::traits::samplers::sample_discrete_gaussian(dashu::rational::RBig::from(sigma))
                .map_err(|e| e.to_string())?;
        }
        let opendp_ms = start.elapsed().as_secs_f64() * 1e3 * coordinates as f64 / opendp_samples.max(1) as f64;
        lines.push(serde_json::json!({
            "bench": "dp_noise",
            "coordinates": coordinates,
            "sigma": sigma,
            "threads": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "noise_ms_median": ours,
            "noise_ms_runs": repeat,
            "opendp_ms_extrapolated": opendp_ms,
            "opendp_samples_timed": opendp_samples,
            "speedup_vs_opendp": opendp_ms / ours,
            "noise_ms_one_thread": one_thread,
            "speedup_vs_opendp_per_thread": opendp_ms / one_thread,
        }));
    }
    // One party's distributed-DP encoding of a 1M update (10 parties, 7
    // honest, 32 bits): the noise drawn ahead of the round, then rotation,
    // clipping, conditional rounding, noise and the modular words.
    {
        let ddg = confide_bench::ddg_bench_mechanism(coordinates)?;
        let update: Vec<f32> = (0..coordinates).map(|i| ((i % 1000) as f32 - 500.0) * 1e-6).collect();
        let mut rng = confide_dp::sampler::os_seeded_rng().map_err(|e| e.to_string())?;
        let (mut presample, mut encode) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            let start = Instant::now();
            let noise = ddg.sample_noise().map_err(|e| e.to_string())?;
            presample.push(start.elapsed().as_secs_f64() * 1e3);
            let start = Instant::now();
            ddg.encode(&update, noise, &[7; 32], &mut rng).map_err(|e| e.to_string())?;
            encode.push(start.elapsed().as_secs_f64() * 1e3);
        }
        lines.push(serde_json::json!({
            "bench": "ddg_encode",
            "coordinates": coordinates,
            "padded": ddg.padded_dim(),
            "bits": 32,
            "local_sigma": ddg.local_sigma(),
            "dp_presample_ms": median_ms(presample),
            "encode_ms_median": median_ms(encode),
        }));
    }
    let event = DpEvent::PoissonSampledGaussian { sampling_rate: 0.01, noise_multiplier: 1.1 };
    // ε for `steps` DP-SGD steps, timed: RDP, then the PLD on the same case
    // (continuous noise, so no lattice slack: the figure dp_accounting's
    // PLDAccountant also computes).
    let timed = |runs: usize, eps_of: &dyn Fn() -> Result<f64, String>| -> Result<(f64, f64), String> {
        let mut times = Vec::new();
        let mut eps = 0.0;
        for _ in 0..runs {
            let start = Instant::now();
            eps = eps_of()?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        Ok((eps, median_ms(times)))
    };
    let rdp = timed(repeat.max(20), &|| {
        let mut acc = RdpAccountant::new();
        acc.compose(&event, steps).map_err(|e| e.to_string())?;
        Ok(acc.epsilon(1e-5).map_err(|e| e.to_string())?.0)
    })?;
    let pld = timed(repeat.clamp(3, 10), &|| {
        let mut acc = confide_dp::pld::PldAccountant::new(0);
        acc.compose(&event, steps).map_err(|e| e.to_string())?;
        acc.epsilon(1e-5).map_err(|e| e.to_string())
    })?;
    // DP-SGD jobs are charged for the discrete Gaussian their noise is
    // (Zhu and Wang's subsampled bound, integer orders): timed too.
    let discrete = DpEvent::PoissonSampledDiscreteGaussian { sampling_rate: 0.01, noise_multiplier: 1.1 };
    let rdp_discrete = timed(repeat.max(20), &|| {
        let mut acc = RdpAccountant::new();
        acc.compose(&discrete, steps).map_err(|e| e.to_string())?;
        Ok(acc.epsilon(1e-5).map_err(|e| e.to_string())?.0)
    })?;
    for (name, event, (eps, ms)) in
        [("rdp", "gaussian", rdp), ("pld", "gaussian", pld), ("rdp", "discrete_gaussian", rdp_discrete)]
    {
        lines.push(serde_json::json!({
            "bench": "dp_accountant",
            "accountant": name,
            "event": event,
            "sampling_rate": 0.01,
            "noise_multiplier": 1.1,
            "steps": steps,
            "delta": 1e-5,
            "epsilon": eps,
            "ms_median": ms,
        }));
    }
    Ok(lines)
}
