//! `confide-bench joint`: what hard-example mining buys on the UCI digits.
//! A small edge MLP and a cloud CNN are trained on the same 70% of the rows
//! (libtorch, one thread); on the other 30% each rule and threshold sends
//! the edge's hard examples to the cloud model, and the table reports the
//! fraction forwarded, the joint accuracy, its distance from cloud-only and
//! McNemar's exact test against cloud-only, beside edge-only and cloud-only.
//! (Latency through the federation is measured once forwarding runs over
//! the parties' streams.)

use confide_algorithms::data::{CsvOptions, Dataset};
use confide_algorithms::hard_examples::{HardExampleRule, mcnemar_exact};
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{FitConfig, ModelConfig, OptimizerKind, TrainConfig, Trainer};
use confide_party::trainers::BuiltinTrainers;

/// `model` trained on `train` (standardised with its statistics) for
/// `epochs` epochs of Adam, one libtorch thread.
pub(crate) fn train(
    model: &ModelConfig,
    train: &Dataset,
    test: &Dataset,
    epochs: u32,
) -> Result<Box<dyn Trainer>, String> {
    let factory = BuiltinTrainers::new(Default::default(), 1);
    let mut t = factory.build_model(model, 7, train.clone(), test.clone(), "bench")?;
    let mut p = t.parameters().map_err(|e| e.to_string())?;
    apply_feature_stats(&mut p, &train.feature_stats()).map_err(|e| e.to_string())?;
    t.set_parameters(&p).map_err(|e| e.to_string())?;
    let tc = TrainConfig {
        local_epochs: epochs,
        batch_size: 32,
        learning_rate: 0.01,
        optimizer: OptimizerKind::Adam,
        ..TrainConfig::default()
    };
    t.fit(&FitConfig { round: 1, train: tc }).map_err(|e| e.to_string())?;
    Ok(t)
}

/// A rule at a threshold.
type RuleOf = fn(f64) -> HardExampleRule;

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
}

/// The table, one JSON object per line: edge-only, cloud-only, then each
/// rule at each threshold.
pub fn bench_joint(data: &std::path::Path, epochs: u32) -> Result<Vec<serde_json::Value>, String> {
    let ds = Dataset::load_csv(data, &CsvOptions { header: false, label_column: -1 }).map_err(|e| e.to_string())?;
    let (train_rows, test) = ds.shuffle_split(0.3, 11);
    let classes = 10;
    let edge_model = ModelConfig::mlp(classes, vec![16]);
    let cloud_model = ModelConfig::cnn(classes, vec![16, 32], [1, 8, 8]);
    let edge = train(&edge_model, &train_rows, &test, epochs)?;
    let cloud = train(&cloud_model, &train_rows, &test, epochs)?;
    let pe = edge.predict(&test.features).map_err(|e| e.to_string())?;
    let pc = cloud.predict(&test.features).map_err(|e| e.to_string())?;
    let n = test.len();
    let right = |p: &[f32], i: usize| argmax(&p[i * classes..(i + 1) * classes]) == test.labels[i] as usize;
    let edge_right: Vec<bool> = (0..n).map(|i| right(&pe, i)).collect();
    let cloud_right: Vec<bool> = (0..n).map(|i| right(&pc, i)).collect();
    let acc = |r: &[bool]| r.iter().filter(|&&x| x).count() as f64 / n as f64;
    let (edge_acc, cloud_acc) = (acc(&edge_right), acc(&cloud_right));
    let only_edge = (0..n).filter(|&i| edge_right[i] && !cloud_right[i]).count() as u64;
    let only_cloud = (0..n).filter(|&i| !edge_right[i] && cloud_right[i]).count() as u64;
    let mut out = vec![
        serde_json::json!({ "bench": "joint", "mode": "edge-only", "rows": n, "forwarded": 0.0, "accuracy": edge_acc,
            "model": "mlp [16]", "points_below_cloud": (cloud_acc - edge_acc) * 100.0,
            "mcnemar_p_vs_cloud": mcnemar_exact(only_edge, only_cloud) }),
        serde_json::json!({ "bench": "joint", "mode": "cloud-only", "rows": n, "forwarded": 1.0, "accuracy": cloud_acc,
            "model": "cnn [16, 32]" }),
    ];
    let grid: [(RuleOf, &[f64]); 3] = [
        (|t| HardExampleRule::Confidence { threshold: t }, &[0.6, 0.8, 0.9, 0.95, 0.99]),
        (|t| HardExampleRule::Margin { threshold: t }, &[0.2, 0.4, 0.6, 0.8, 0.9]),
        (|t| HardExampleRule::Entropy { threshold: t }, &[0.05, 0.1, 0.2, 0.3, 0.5]),
    ];
    for (make, thresholds) in grid {
        for &t in thresholds {
            let rule = make(t);
            rule.validate()?;
            let hard: Vec<bool> = (0..n).map(|i| rule.is_hard(&pe[i * classes..(i + 1) * classes])).collect();
            let joint_right: Vec<bool> = (0..n).map(|i| if hard[i] { cloud_right[i] } else { edge_right[i] }).collect();
            let b = (0..n).filter(|&i| joint_right[i] && !cloud_right[i]).count() as u64;
            let c = (0..n).filter(|&i| !joint_right[i] && cloud_right[i]).count() as u64;
            let joint_acc = acc(&joint_right);
            out.push(serde_json::json!({
                "bench": "joint", "mode": "joint", "rule": rule.name(), "threshold": t, "rows": n,
                "forwarded": hard.iter().filter(|&&h| h).count() as f64 / n as f64,
                "accuracy": joint_acc,
                "points_below_cloud": (cloud_acc - joint_acc) * 100.0,
                "mcnemar_p_vs_cloud": mcnemar_exact(b, c),
            }));
        }
    }
    Ok(out)
}

/// One deployment of the edge service in the latency table.
struct EdgeConfig {
    mode: &'static str,
    rule: Option<HardExampleRule>,
}

/// `confide-bench joint --latency`: the same two models trained through a
/// federation in this process (coordinator, an edge party and a cloud
/// party over loopback mutual TLS, one party per job), deployed as an
/// administrator would, and the edge's endpoint loaded with the held-out
/// rows one per request: latency and the fraction the cloud answered, for
/// edge-only, each rule and threshold, and cloud-only (every row forwarded).
pub async fn bench_joint_latency(
    data: &std::path::Path,
    rounds: u32,
    clients: usize,
    seconds: f64,
) -> Result<Vec<serde_json::Value>, String> {
    use confide_crypto::pki::PkiDir;
    use confide_party::config::PartyConfig;
    use confide_party::node::PartyNode;
    use confide_proto::deploy::{DeployAction, DeploymentRecord, JointConfig, SignedDeployment};
    use confide_proto::pb;
    use std::time::Duration;

    let e = |e: &dyn std::fmt::Display| e.to_string();
    let dir = tempfile::tempdir().map_err(|x| e(&x))?;
    let pki = PkiDir::new(dir.path().join("pki"));
    pki.init("bench", &["edge-0".into(), "cloud-0".into()], &[]).map_err(|x| e(&x))?;
    let ds = Dataset::load_csv(data, &CsvOptions { header: false, label_column: -1 }).map_err(|x| e(&x))?;
    let (train_rows, test) = ds.shuffle_split(0.3, 11);
    std::fs::write(dir.path().join("train.csv"), train_rows.to_csv()).map_err(|x| e(&x))?;
    let (coordinator, url) = crate::inproc::start_coordinator(dir.path(), &pki).await?;
    let config = |name: &str, extra: &str| -> Result<PartyConfig, String> {
        let path = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "coordinator = {url:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n[datasets.digits]\npath = \"train.csv\"\n\
             [training]\nthreads = 1\n{extra}",
            pki.ca_cert(),
            pki.party_cert(name),
            pki.party_key(name)
        );
        std::fs::write(&path, text).map_err(|x| e(&x))?;
        PartyConfig::load(&path).map_err(|x| e(&x))
    };
    let edge_cfg = config(
        "edge-0",
        "[serve]\nservices = [\"digits\"]\nlisten = \"127.0.0.1:0\"\n[policy.share_inputs]\ndigits = [\"cloud-0\"]\n",
    )?;
    let cloud_cfg = config(
        "cloud-0",
        "[serve]\nservices = [\"digits-cloud\"]\nlisten = \"127.0.0.1:0\"\n[cloud]\nservices = [\"digits-cloud\"]\n",
    )?;
    let edge = std::sync::Arc::new(PartyNode::with_plugins(edge_cfg, Default::default()));
    let cloud = std::sync::Arc::new(PartyNode::with_plugins(cloud_cfg, Default::default()));
    let addr = edge.start_serving().await.map_err(|x| e(&x))?.ok_or("no endpoint")?;
    let cloud_addr = cloud.start_serving().await.map_err(|x| e(&x))?.ok_or("no cloud endpoint")?;
    let tasks = [edge.clone(), cloud.clone()].map(|n| tokio::spawn(async move { n.run().await }));

    let mut admin = crate::inproc::admin(&pki, &url).await?;
    let spec = |party: &str, model: &str| {
        format!(
            "name = \"{party}\"\nkind = \"train\"\nrounds = 1\n[parties]\nnames = [\"{party}\"]\ndataset = \"digits\"\n\
             [model]\n{model}\n[training]\nlocal_epochs = {rounds}\noptimizer = \"adam\"\nlearning_rate = 0.01\nbatch_size = 32\n\
             validation_fraction = 0.0\nseed = 7\n[timeouts]\nrecruit_secs = 60\n"
        )
    };
    let mut jobs = Vec::new();
    for (party, model) in [
        ("edge-0", "kind = \"mlp\"\nclasses = 10\nhidden = [16]"),
        ("cloud-0", "kind = \"cnn\"\nclasses = 10\nchannels = [16, 32]\nimage = [1, 8, 8]"),
    ] {
        let r = admin
            .submit_job(pb::SubmitJobRequest { spec_toml: spec(party, model), file_name: party.into(), grant: None })
            .await
            .map_err(|s| s.message().to_string())?;
        jobs.push(r.into_inner().job_id);
    }
    for job in &jobs {
        crate::inproc::wait_succeeded(&mut admin, job).await?;
    }
    let (admin_key, admin_der, _) = confide_proto::deploy::admin_signer(&pki).map_err(|x| e(&x))?;
    let mut versions = Vec::new();
    for job in &jobs {
        versions.push(crate::inproc::latest_version(&mut admin, job).await?);
    }
    let record = |service: &str, seq: u64, v: &pb::ModelVersion, joint: Option<JointConfig>| DeploymentRecord {
        service: service.into(),
        sequence: seq,
        action: DeployAction::Deploy,
        job_id: v.job_id.clone(),
        round: v.round,
        sha256: v.sha256.clone(),
        architecture: v.architecture.clone(),
        rollback_to: seq.checked_sub(1).filter(|&s| s > 0),
        issued_at: 0,
        admin: confide_crypto::pki::ADMIN_NAME.into(),
        joint,
        pipeline: None,
    };
    let mut deploy = async |r: DeploymentRecord| -> Result<(), String> {
        let signed = SignedDeployment::sign(r, &admin_key, admin_der.clone()).map_err(|x| e(&x))?;
        admin.deploy(signed.to_pb()).await.map_err(|s| s.message().to_string())?;
        Ok(())
    };
    deploy(record("digits-cloud", 1, &versions[1], None)).await?;
    let registry = cloud.serving().ok_or("cloud not serving")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while registry.current("digits-cloud").is_err() {
        if std::time::Instant::now() > deadline {
            return Err("the cloud model was never served".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut configs = vec![EdgeConfig { mode: "edge-only", rule: None }];
    for t in [0.9, 0.99] {
        configs.push(EdgeConfig { mode: "joint", rule: Some(HardExampleRule::Confidence { threshold: t }) });
    }
    for t in [0.4, 0.9] {
        configs.push(EdgeConfig { mode: "joint", rule: Some(HardExampleRule::Margin { threshold: t }) });
    }
    for t in [0.2, 0.05] {
        configs.push(EdgeConfig { mode: "joint", rule: Some(HardExampleRule::Entropy { threshold: t }) });
    }
    let bodies: Vec<bytes::Bytes> =
        (0..test.len()).map(|i| confide_bench::loadgen::body(test.row(i), test.num_features, 1)).collect();
    let labels = Some(test.labels.clone());
    let load = |addr, service: &str| {
        let (bodies, labels) = (bodies.clone(), labels.clone());
        let path = format!("/v1/services/{service}/predict");
        async move {
            confide_bench::loadgen::run_bodies(
                addr,
                &path,
                bodies,
                labels,
                1,
                clients,
                Duration::from_secs_f64(seconds),
            )
            .await
        }
    };
    // Cloud-only: the cloud model at the cloud party's own endpoint.
    let cloud_only = load(cloud_addr, "digits-cloud").await;
    let accuracy = |c: &[Option<bool>]| {
        let answered: Vec<bool> = c.iter().flatten().copied().collect();
        (answered.iter().filter(|&&x| x).count() as f64 / answered.len().max(1) as f64, answered.len())
    };
    let (cloud_acc, _) = accuracy(&cloud_only.correct);
    let edge_registry = edge.serving().ok_or("edge not serving")?;
    let mut out = vec![serde_json::json!({
        "bench": "joint-latency", "mode": "cloud-only", "where": "the cloud party's own endpoint",
        "clients": clients, "requests": cloud_only.requests, "failures": cloud_only.failures,
        "accuracy": cloud_acc, "p50_ms": cloud_only.p50_ms, "p99_ms": cloud_only.p99_ms,
        "requests_per_sec": cloud_only.requests_per_sec,
    })];
    for (i, c) in configs.iter().enumerate() {
        let seq = i as u64 + 1;
        let joint = c.rule.map(|rule| JointConfig {
            cloud: "cloud-0".into(),
            cloud_service: "digits-cloud".into(),
            hard_examples: rule,
            timeout_ms: 2000,
        });
        deploy(record("digits", seq, &versions[0], joint)).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while edge_registry.current("digits").map(|s| s.deployment.record.sequence) != Ok(seq) {
            if std::time::Instant::now() > deadline {
                return Err(format!("edge deployment {seq} was never served"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let report = load(addr, "digits").await;
        let answered = report.requests.saturating_sub(report.failures).max(1) as f64;
        let (acc, rows_seen) = accuracy(&report.correct);
        let (mut only_joint, mut only_cloud) = (0u64, 0u64);
        for (mine, cloud) in report.correct.iter().zip(&cloud_only.correct) {
            match (mine, cloud) {
                (Some(true), Some(false)) => only_joint += 1,
                (Some(false), Some(true)) => only_cloud += 1,
                _ => {}
            }
        }
        out.push(serde_json::json!({
            "bench": "joint-latency",
            "mode": c.mode,
            "rule": c.rule.map(|r| r.name()),
            "threshold": c.rule.map(|r| r.threshold()),
            "clients": clients,
            "requests": report.requests,
            "failures": report.failures,
            "first_failure": report.first_failure,
            "forwarded": report.rows_from_cloud as f64 / answered,
            "edge_fallback_rows": report.rows_edge_fallback,
            "accuracy": acc,
            "rows_scored": rows_seen,
            "points_below_cloud": (cloud_acc - acc) * 100.0,
            "mcnemar_p_vs_cloud": mcnemar_exact(only_joint, only_cloud),
            "p50_ms": report.p50_ms,
            "p99_ms": report.p99_ms,
            "forwarded_p50_ms": report.cloud_p50_ms,
            "forwarded_p99_ms": report.cloud_p99_ms,
            "requests_per_sec": report.requests_per_sec,
        }));
    }
    for t in tasks {
        t.abort();
    }
    // The parties' streams end with their tasks; do not wait on stragglers.
    let _ = tokio::time::timeout(Duration::from_secs(2), coordinator.stop()).await;
    Ok(out)
}
