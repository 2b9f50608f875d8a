//! `confide-bench incremental`: how long an incremental pipeline takes from
//! its trigger to a deployed version, and how much of that is the
//! framework rather than the parties' training.
//!
//! A federation runs in this process (the coordinator and three parties
//! over loopback mutual TLS). The UCI digits are split across the parties
//! and arrive in batches; a small MLP is trained on the first batch and
//! deployed as an administrator would; a pipeline (three rounds of
//! training per iteration, accuracy gate with `min_delta = -1`, so every
//! iteration deploys) then retrains as each further batch lands. For each
//! iteration the bench reports the pipeline's trigger-to-deployment time
//! (counting, the post-deployment check, training, the gate and the signed
//! deployment), the parties' reported training time within it, the
//! framework's share (the rest: coordination, evaluation jobs, checkpoints,
//! signing), and the time from the batch landing to the serving party
//! answering with the new version (which adds the pipeline's poll interval
//! and the party's pull).

use std::path::Path;
use std::time::{Duration, Instant};

use confide_algorithms::data::{CsvOptions, Dataset};

/// Runs the benchmark: `batches` batches after the first, polled every
/// `poll_secs`. One JSON object per iteration, then a summary.
pub async fn bench_incremental(data: &Path, batches: usize, poll_secs: f64) -> Result<Vec<serde_json::Value>, String> {
    use confide_crypto::pki::PkiDir;
    use confide_party::config::PartyConfig;
    use confide_party::node::PartyNode;
    use confide_proto::deploy::{DeployAction, DeploymentRecord, PipelineGrant, SignedDeployment, SignedGrant};
    use confide_proto::pb;

    let e = |e: &dyn std::fmt::Display| e.to_string();
    let names = ["hospital-a", "hospital-b", "hospital-c"];
    let dir = tempfile::tempdir().map_err(|x| e(&x))?;
    let pki = PkiDir::new(dir.path().join("pki"));
    pki.init("bench", &names.map(String::from), &[]).map_err(|x| e(&x))?;
    let ds = Dataset::load_csv(data, &CsvOptions { header: false, label_column: -1 }).map_err(|x| e(&x))?;
    // Each party's rows in `batches + 1` equal batches.
    let (parts, total_batches) = (names.len(), batches + 1);
    let per = ds.len() / (parts * total_batches);
    let batch_rows = |party: usize, batch: usize| {
        let start = (batch * parts + party) * per;
        ds.select(&(start..start + per).collect::<Vec<_>>())
    };
    let write_batch = |party: usize, batch: usize| -> Result<(), String> {
        let d = dir.path().join("batches").join(names[party]);
        std::fs::create_dir_all(&d).map_err(|x| e(&x))?;
        let tmp = d.join(format!(".{batch:03}.tmp"));
        std::fs::write(&tmp, batch_rows(party, batch).to_csv()).map_err(|x| e(&x))?;
        std::fs::rename(&tmp, d.join(format!("{batch:03}.csv"))).map_err(|x| e(&x))
    };
    for p in 0..parts {
        write_batch(p, 0)?;
    }
    let (coordinator, url) = crate::inproc::start_coordinator(dir.path(), &pki).await?;
    let mut nodes = Vec::new();
    let mut endpoint = None;
    for (i, name) in names.iter().enumerate() {
        let serve = if i == 0 { "[serve]\nservices = [\"digits\"]\nlisten = \"127.0.0.1:0\"\n" } else { "" };
        let path = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "coordinator = {url:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\n[datasets.digits]\npath = {:?}\n\
             [training]\nthreads = 1\n{serve}",
            pki.ca_cert(),
            pki.party_cert(name),
            pki.party_key(name),
            dir.path().join("batches").join(name)
        );
        std::fs::write(&path, text).map_err(|x| e(&x))?;
        let node = std::sync::Arc::new(PartyNode::with_plugins(
            PartyConfig::load(&path).map_err(|x| e(&x))?,
            Default::default(),
        ));
        if let Some(addr) = node.start_serving().await.map_err(|x| e(&x))? {
            endpoint = Some(addr);
        }
        nodes.push(node);
    }
    let endpoint = endpoint.ok_or("no prediction endpoint")?;
    let _tasks: Vec<_> = nodes.iter().cloned().map(|n| tokio::spawn(async move { n.run().await })).collect();

    let mut admin = crate::inproc::admin(&pki, &url).await?;
    let model = "kind = \"mlp\"\nclasses = 10\nhidden = [32]";
    let spec = |kind: &str, extra: &str| {
        format!(
            "name = \"incremental bench\"\nkind = \"{kind}\"\nrounds = 3\n[parties]\nnames = [\"hospital-a\", \
             \"hospital-b\", \"hospital-c\"]\ndataset = \"digits\"\n[model]\n{model}\n[training]\nlocal_epochs = 2\n\
             optimizer = \"adam\"\nlearning_rate = 0.01\nbatch_size = 32\nseed = 7\n[timeouts]\nrecruit_secs = 60\n{extra}"
        )
    };
    // The first version, trained on the first batch and deployed.
    let first = admin
        .submit_job(pb::SubmitJobRequest { spec_toml: spec("train", ""), file_name: "first".into(), grant: None })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .job_id;
    crate::inproc::wait_succeeded(&mut admin, &first).await?;
    let v = crate::inproc::latest_version(&mut admin, &first).await?;
    let (admin_key, admin_der, admin_name) = confide_proto::deploy::admin_signer(&pki).map_err(|x| e(&x))?;
    let record = DeploymentRecord {
        service: "digits".into(),
        sequence: 1,
        action: DeployAction::Deploy,
        job_id: v.job_id.clone(),
        round: v.round,
        sha256: v.sha256.clone(),
        architecture: v.architecture.clone(),
        rollback_to: None,
        issued_at: confide_coordinator::db::unix_now(),
        admin: admin_name.clone(),
        joint: None,
        pipeline: None,
    };
    let signed = SignedDeployment::sign(record, &admin_key, admin_der.clone()).map_err(|x| e(&x))?;
    admin.deploy(signed.to_pb()).await.map_err(|s| s.message().to_string())?;

    // The pipeline, with the administrator's grant. Its first iteration
    // trains on the first batch (new to it); then one batch lands at each
    // party at a time, and the trigger waits for all three.
    let inc = format!(
        "[incremental]\nservice = \"digits\"\nmin_new_rows = {}\npoll_secs = {poll_secs}\nmin_delta = -1.0\n\
         max_iterations = {}\n",
        per * parts,
        total_batches
    );
    let text = spec("incremental", &inc);
    let now = confide_coordinator::db::unix_now();
    let grant = PipelineGrant {
        service: "digits".into(),
        spec_sha256: confide_proto::deploy::spec_sha256(&text),
        architecture: v.architecture.clone(),
        joint: None,
        after_sequence: 1,
        issued_at: now,
        expires_at: now + 86_400,
        admin: admin_name,
    };
    let grant = SignedGrant::sign(grant, &admin_key, admin_der).map_err(|x| e(&x))?;
    let pipeline = admin
        .submit_job(pb::SubmitJobRequest { spec_toml: text, file_name: "pipeline".into(), grant: Some(grant.to_pb()) })
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner()
        .job_id;
    let mut out = Vec::new();
    let mut landed = Instant::now();
    for iteration in 1..=total_batches {
        if iteration > 1 {
            for p in 0..parts {
                write_batch(p, iteration - 1)?;
            }
            landed = Instant::now();
        }
        let st = crate::inproc::wait(&mut admin, &pipeline, |s| {
            s.iterations.get(iteration - 1).is_some_and(|it| it.outcome != "running") || s.state.is_terminal()
        })
        .await?;
        let it = st.iterations.get(iteration - 1).cloned().ok_or_else(|| format!("pipeline ended: {:?}", st.error))?;
        let seq = it.deployed_sequence.ok_or_else(|| format!("iteration {iteration} did not deploy: {}", it.gate))?;
        // Until the serving party answers with it.
        loop {
            let (_, body) = confide_bench::loadgen::request_once(endpoint, "GET", "/healthz", "")
                .await
                .map_err(|x| x.to_string())?;
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|x| e(&x))?;
            if v["services"]["digits"]["version"]["sequence"].as_u64() == Some(seq) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let served_ms = landed.elapsed().as_secs_f64() * 1000.0;
        // A figure the coordinator did not record (a deployment made before
        // a restart) is null, not a measured 0 (the means skip it).
        let total = it.trigger_to_deploy_ms.map(|t| t as f64);
        let compute = it.compute_ms.map(|c| c as f64);
        let framework = total.zip(compute).map(|(t, c)| t - c);
        out.push(serde_json::json!({
            "bench": "incremental",
            "iteration": iteration,
            "rows_per_party_per_batch": per,
            "new_rows": it.new_rows,
            "trigger_to_deploy_ms": total,
            "parties_training_ms": compute,
            "framework_ms": framework,
            "framework_share": total.zip(framework).filter(|(t, _)| *t > 0.0).map(|(t, f)| f / t),
            "batch_to_served_ms": if iteration > 1 { Some(served_ms) } else { None },
            "poll_secs": poll_secs,
            "candidate_accuracy": it.candidate_metric,
            "deployed_accuracy": it.deployed_metric,
        }));
    }
    let mean = |key: &str| {
        let v: Vec<f64> = out.iter().filter_map(|o| o[key].as_f64()).collect();
        if v.is_empty() { None } else { Some(v.iter().sum::<f64>() / v.len() as f64) }
    };
    out.push(serde_json::json!({
        "bench": "incremental summary",
        "iterations": out.len(),
        "mean_trigger_to_deploy_ms": mean("trigger_to_deploy_ms"),
        "mean_parties_training_ms": mean("parties_training_ms"),
        "mean_framework_share": mean("framework_share"),
        "mean_batch_to_served_ms": mean("batch_to_served_ms"),
    }));
    // (The coordinator's graceful stop would wait for the parties' streams.)
    drop(coordinator);
    Ok(out)
}
