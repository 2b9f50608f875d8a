//! `confide-bench`: whole-round benchmarks printing one JSON object per
//! configuration, so that privacy overheads are ratios measured in one run.
//!
//! `round` runs the coordinator and N parties as tasks of one tokio runtime,
//! talking gRPC over loopback mutual TLS 1.3 exactly as separate processes
//! would. Parties run a synthetic trainer (one cheap pass over the
//! parameters), so the figures are the framework's cost, not a model's.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::{Parser, Subcommand};
use confide_algorithms::data::{CsvOptions, DataFormat, DatasetSource};
use confide_algorithms::{
    Error as AlgoError, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Metrics, Parameters, Tensor, Trainer,
};
use confide_coordinator::server::{self, CoordinatorConfig};
use confide_crypto::pki::PkiDir;
use confide_party::config::{PartyConfig, Policy, Reconnect};
use confide_party::node::{NodeStats, PartyNode};
use confide_party::trainers::TrainerFactory;
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
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
        /// Privacy modes (comma-separated); `none` today.
        #[arg(long, value_delimiter = ',', default_value = "none")]
        privacy: Vec<String>,
        /// Measured rounds per configuration.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Print JSON objects, one per line (the default output format).
        #[arg(long)]
        json: bool,
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

/// Runs one SecAgg+ round over `n` parties and reports per-stage costs.
fn secagg_scaling(n: usize, dim: usize) -> Result<serde_json::Value, String> {
    use confide_crypto::secagg::graph::degree_for;
    use confide_crypto::secagg::protocol::{Client, Config, Server};
    use std::time::Instant;
    let degree = degree_for(n, 20, 3.0);
    let k = degree.min(n - 1);
    let threshold = ((0.6 * k as f64).ceil() as usize).clamp(2, k);
    let cfg = Config {
        job: "scaling".into(),
        round: 1,
        parties: (0..n).map(|i| format!("p{i:04}")).collect(),
        threshold,
        degree,
        graph_seed: [3; 32],
        bits: 32,
        dim,
    };
    let e = |e: confide_crypto::Error| e.to_string();
    let mut rng = rand_core::OsRng;
    let mut server = Server::new(cfg.clone()).map_err(e)?;
    let mut clients = Vec::with_capacity(n);
    for p in &cfg.parties {
        let (c, m) = Client::new(cfg.clone(), p, &BenchSigner(p.clone()), &mut rng).map_err(e)?;
        server.on_keys(m).map_err(e)?;
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
    let mut mask_ms = Vec::new();
    for (c, p) in clients.iter_mut().zip(&cfg.parties) {
        let shares = server.shares_for(p);
        let t = Instant::now();
        let y = c.on_shares(&shares, &input).map_err(e)?;
        mask_ms.push(t.elapsed().as_secs_f64() * 1e3);
        server.on_masked(y).map_err(e)?;
    }
    let req = server.close_masked().map_err(e)?;
    for c in clients.iter_mut() {
        server.on_unmask(c.on_unmask(&req).map_err(e)?).map_err(e)?;
    }
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
        "server_unmask_ms": unmask_ms,
    }))
}

/// One parameter vector; "training" adds a small deterministic step, so the
/// cost is one pass over the values, as for a real update.
struct SyntheticTrainer {
    params: Parameters,
}

impl Trainer for SyntheticTrainer {
    fn parameters(&self) -> Parameters {
        self.params.clone()
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

async fn bench_round(parties: usize, params: usize, privacy: &str, rounds: u32) -> Result<serde_json::Value, String> {
    let privacy_table = match privacy {
        "none" => String::new(),
        "secagg" => "[privacy]\nmode = \"secagg\"\nmax_examples = 1000\n".to_string(),
        other => return Err(format!("--privacy {other}: unknown (none, secagg)")),
    };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let names: Vec<String> = (0..parties).map(|i| format!("p{i:03}")).collect();
    let pki = PkiDir::new(dir.path().join("pki"));
    pki.init("bench", &names, &[]).map_err(|e| e.to_string())?;
    let coordinator = server::start(CoordinatorConfig {
        listen: "127.0.0.1:0".parse().map_err(|_| "addr")?,
        data_dir: dir.path().join("coordinator"),
        pki: pki.root().to_path_buf(),
        limits: Limits::default(),
    })
    .await
    .map_err(|e| e.to_string())?;
    let url = format!("https://{}", coordinator.local_addr);
    let mut stats: Vec<Arc<NodeStats>> = Vec::new();
    let mut tasks = Vec::new();
    for n in &names {
        let cfg = PartyConfig {
            coordinator: url.clone(),
            server_name: "localhost".into(),
            ca: pki.ca_cert(),
            cert: pki.party_cert(n),
            key: pki.party_key(n),
            datasets: [(
                "synthetic".to_string(),
                DatasetSource { path: PathBuf::from("unused"), format: DataFormat::Csv, csv: CsvOptions::default() },
            )]
            .into(),
            policy: Policy { privacy_modes: vec!["none".into(), "secagg".into()], ..Policy::default() },
            reconnect: Reconnect::default(),
            limits: Limits::default(),
            fault: Default::default(),
            models: Default::default(),
            training: Default::default(),
        };
        let node = PartyNode::new(cfg, Arc::new(SyntheticFactory { params }));
        stats.push(node.stats());
        tasks.push(tokio::spawn(async move { node.run().await }));
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    let spec = format!(
        "name = \"bench\"\nkind = \"train\"\nrounds = {}\n[parties]\nnames = [{}]\ndataset = \"synthetic\"\n\
         [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n[evaluation]\nevery = 100000\n\
         [timeouts]\nrecruit_secs = 120\nround_secs = 600\n{privacy_table}",
        rounds + 1,
        quoted.join(",")
    );
    let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
    let id = ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
    let mut admin = AdminServiceClient::new(connect(&id).await.map_err(|e| e.to_string())?);
    let job = admin
        .submit_job(pb::SubmitJobRequest { spec_toml: spec, file_name: "bench".into() })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .job_id;
    let status = loop {
        let s = admin.get_job(pb::JobRef { job_id: job.clone() }).await.map_err(|s| s.message().to_string())?;
        let st: JobStatus = serde_json::from_str(&s.into_inner().status_json).map_err(|e| e.to_string())?;
        if st.state.is_terminal() {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for t in tasks {
        t.abort();
    }
    coordinator.stop().await;
    if status.state.as_str() != "succeeded" {
        return Err(format!("benchmark job {}: {}", status.state.as_str(), status.error.unwrap_or_default()));
    }
    // The last round also evaluates; measure the rounds before it.
    let measured: Vec<_> = status.history.iter().filter(|r| r.round <= rounds).collect();
    let metric = |k: &str| median(measured.iter().filter_map(|r| r.metrics.get(k).copied()).collect());
    let bytes: u64 =
        stats.iter().map(|s| s.bytes_sent.load(Ordering::Relaxed) + s.bytes_received.load(Ordering::Relaxed)).sum();
    Ok(serde_json::json!({
        "bench": "round",
        "privacy": privacy,
        "parties": parties,
        "params": params,
        "rounds": measured.len(),
        "round_ms_median": metric("round_ms"),
        "coordinator_ms_median": metric("coordinator_ms"),
        "party_ms_median": metric("fit_ms"),
        "bytes_per_party": bytes / (parties as u64 * u64::from(rounds + 1)),
        "topology": "coordinator and parties as tasks of one tokio runtime; gRPC over loopback mutual TLS 1.3",
    }))
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Round { parties, params, privacy, rounds, json } => {
            let mut failed = false;
            for &n in &parties {
                for &p in &params {
                    // Every mode of one configuration runs back to back, so the
                    // overhead is a ratio measured in one run.
                    let mut plain_ms = None;
                    for mode in &privacy {
                        match bench_round(n, p, mode, rounds.max(1)).await {
                            Ok(mut v) => {
                                let ms = v["round_ms_median"].as_f64();
                                if mode == "none" {
                                    plain_ms = ms;
                                } else if let (Some(base), Some(ms)) = (plain_ms, ms) {
                                    v["overhead_vs_plain"] = serde_json::json!(ms / base);
                                }
                                if json { println!("{v}") } else { println!("{v:#}") }
                            }
                            Err(e) => {
                                eprintln!("error: parties={n} params={p} privacy={mode}: {e}");
                                failed = true;
                            }
                        }
                    }
                }
            }
            std::process::exit(i32::from(failed));
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
