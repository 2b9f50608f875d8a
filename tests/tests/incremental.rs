//! Incremental learning on real processes: a pipeline bound to a served
//! service counts new batches in the parties' watched directories, trains
//! from the deployed version, gates on the held-out rows, deploys under the
//! administrator's grant (the serving party verifies it), survives a
//! coordinator restart, rolls back when the next (corrupted) batch shows
//! the deployed version worse than the one it replaced, and a gate that
//! asks for more than the candidate gives keeps the deployed version.

use std::path::Path;

use confide_tests::{Federation, job_spec, repo_root};
use serde_json::Value;

mod http;
use http::wait_for_sequence;

/// A federation of two whose site-0 serves "triage": a first job's model
/// deployed by the administrator (deployment 1), then a pipeline submitted
/// on it. Returns the federation, its names, the first job and the pipeline.
fn pipeline_on_a_deployment() -> (Federation, Vec<String>, String, String) {
    let (mut fed, names) = watched_federation(2, 170);
    let watched = |n: &str| format!("[datasets.watched]\npath = \"batches/{n}\"\n");
    fed.start_party("site-0", &format!("{}[serve]\nservices = [\"triage\"]\n", watched("site-0")));
    fed.start_party("site-1", &watched("site-1"));
    let first = job_spec(&names, 2, 1, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4")
        .replace("dataset = \"data\"", "dataset = \"watched\"");
    let v1 = fed.submit("first.toml", &first);
    assert_eq!(fed.wait_done(&v1, 120)["state"], "succeeded", "{}", fed.logs());
    fed.run_ok(&["model", "deploy", "triage", "--job", &v1, "--round", "1"]);
    let p = fed.submit("pipeline.toml", &pipeline_spec(&names, -1.0, 5));
    (fed, names, v1, p)
}

/// Waits for pipeline `p` to pause; its phase.
fn paused_phase(fed: &Federation, p: &str) -> (Value, String) {
    let st = fed.wait_for(p, 180, "the pipeline to pause", |s| {
        s["pipeline_phase"].as_str().is_some_and(|ph| ph.starts_with("paused"))
    });
    let phase = st["pipeline_phase"].as_str().unwrap_or("").to_owned();
    (st, phase)
}

/// A grant of the federation's administrator for the pipeline spec `text`
/// on `service` and `architecture`, signed before any deployment, for an
/// hour.
fn grant_of(admin: &str, service: &str, text: &str, architecture: &str) -> confide_proto::deploy::PipelineGrant {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    confide_proto::deploy::PipelineGrant {
        service: service.into(),
        spec_sha256: confide_proto::deploy::spec_sha256(text),
        architecture: architecture.into(),
        joint: None,
        after_sequence: 0,
        issued_at: now,
        expires_at: now + 3600,
        admin: admin.to_owned(),
    }
}

/// Submits each request through the admin API, as the administrator; why
/// each was refused.
fn refusals(fed: &Federation, requests: Vec<confide_proto::pb::SubmitJobRequest>) -> Vec<String> {
    use confide_proto::net::{ClientIdentity, connect};
    use confide_proto::pb::admin_service_client::AdminServiceClient;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = confide_crypto::pki::PkiDir::new(fed.path("pki"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let (ca, cert, key) = (pki.ca_cert(), pki.admin_cert(), pki.admin_key());
        let url = format!("https://{}", fed.addr);
        let id = ClientIdentity { url: &url, server_name: "localhost", ca: &ca, cert: &cert, key: &key };
        let mut client = AdminServiceClient::new(connect(&id).await.expect("admin connection"));
        let mut refused = Vec::new();
        for req in requests {
            refused.push(client.submit_job(req).await.expect_err("refused").message().to_string());
        }
        refused
    })
}

/// A pipeline submission of `spec` with `grant`.
fn submission(spec: &str, grant: Option<confide_proto::deploy::SignedGrant>) -> confide_proto::pb::SubmitJobRequest {
    confide_proto::pb::SubmitJobRequest {
        spec_toml: spec.to_owned(),
        file_name: "pipeline.toml".into(),
        grant: grant.map(|g| g.to_pb()),
    }
}

/// Writes rows as a batch the way a hospital's export would: a hidden
/// temporary file renamed into the watched directory.
fn drop_batch(dir: &Path, name: &str, rows: &[String]) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, rows.concat()).expect("batch");
    std::fs::rename(&tmp, dir.join(name)).expect("rename batch");
}

/// The party's rows, as CSV lines, with the label (last cell) flipped when `flip`.
fn rows(fed: &Federation, party: &str, range: std::ops::Range<usize>, flip: bool) -> Vec<String> {
    let text = std::fs::read_to_string(fed.path(&format!("data/{party}.csv"))).expect("party data");
    text.lines()
        .skip(range.start)
        .take(range.len())
        .map(|l| {
            let (features, label) = l.rsplit_once(',').expect("label");
            let label = if flip {
                1 - label.trim().parse::<u32>().expect("label")
            } else {
                label.trim().parse().expect("label")
            };
            format!("{features},{label}\n")
        })
        .collect()
}

/// Service `triage`'s deployment history, newest first.
fn service_history(fed: &Federation) -> Vec<Value> {
    fed.run_ok(&["model", "services", "triage", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("history line"))
        .collect()
}

fn iteration(st: &Value, i: usize) -> Value {
    st["iterations"].get(i).cloned().unwrap_or(Value::Null)
}

fn pipeline_spec(names: &[String], min_delta: f64, max_iterations: u32) -> String {
    job_spec(names, 2, 3, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlearning_rate = 0.1")
        .replace("kind = \"train\"", "kind = \"incremental\"")
        .replace("dataset = \"data\"", "dataset = \"watched\"")
        + &format!(
            "[incremental]\nservice = \"triage\"\nmin_new_rows = 100\npoll_secs = 0.3\nmetric = \"accuracy\"\n\
             min_delta = {min_delta}\nmax_iterations = {max_iterations}\n"
        )
}

/// `n` parties sharing the breast-cancer rows, each with a watched
/// directory `batches/NAME` holding its first `first_rows` rows as batch
/// 001; the coordinator started.
fn watched_federation(n: usize, first_rows: usize) -> (Federation, Vec<String>) {
    let names: Vec<String> = (0..n).map(|i| format!("site-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let weights = vec!["1"; n].join(",");
    let mut fed = Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, &weights);
    for name in &names {
        let dir = fed.path(&format!("batches/{name}"));
        std::fs::create_dir_all(&dir).expect("watched dir");
        drop_batch(&dir, "001.csv", &rows(&fed, name, 0..first_rows, false));
    }
    fed.start_coordinator();
    (fed, names)
}

/// A coordinator killed after a pipeline recorded its candidate training's
/// id, before the job existed, submits it under that id after a restart:
/// one training of the iteration, never an orphan beside a second (found by
/// review: the id was recorded only after the job started, so a crash in
/// between resumed the orphan and the pipeline submitted another, each
/// charged to the hospitals). Steps their pipeline does not wait for are
/// not resumed.
#[test]
fn a_pipeline_killed_before_its_training_starts_runs_the_recorded_training_once() {
    let (fed, st, v1) = pipeline_killed_at("pipeline-candidate-recorded");
    let candidate = iteration(&st, 0)["candidate_job"].as_str().expect("a candidate").to_owned();
    let jobs: Vec<Value> = serde_json::from_str(&fed.run_ok(&["job", "list", "--json"])).expect("job list");
    let trainings: Vec<&Value> = jobs.iter().filter(|j| j["kind"] == "train" && j["id"] != v1.as_str()).collect();
    assert_eq!(trainings.len(), 1, "one training of the iteration: {jobs:#?}");
    assert_eq!(trainings[0]["id"], candidate.as_str(), "{jobs:#?}");
    assert_eq!(trainings[0]["state"], "succeeded", "{jobs:#?}");
}

/// A coordinator killed after a pipeline deployed its candidate, before it
/// recorded the iteration as deployed, finds the candidate deployed after
/// its restart: the iteration is recorded deployed, not gated against the
/// candidate itself and deployed a second time (found by review).
#[test]
fn a_pipeline_killed_after_deploying_records_the_deployment_once() {
    let (fed, st, _) = pipeline_killed_at("pipeline-deployed");
    let it = iteration(&st, 0);
    assert_eq!((it["outcome"].as_str(), it["deployed_sequence"].as_u64()), (Some("deployed"), Some(2)), "{it:#}");
    assert!(it["gate"].as_str().unwrap_or("").starts_with("passed"), "{it:#}");
    let history = service_history(&fed);
    assert_eq!(history.len(), 2, "the administrator's deployment and the pipeline's, once: {history:#?}");
}

/// A barely trained first version of service "triage" on the watched data
/// sets, deployed by the administrator; its job's id.
fn deploy_a_weak_first_version(fed: &Federation, names: &[String]) -> String {
    let weak =
        job_spec(names, 2, 1, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlearning_rate = 0.00001")
            .replace("dataset = \"data\"", "dataset = \"watched\"");
    let v1 = fed.submit("weak.toml", &weak);
    assert_eq!(fed.wait_done(&v1, 120)["state"], "succeeded", "{}", fed.logs());
    fed.run_ok(&["model", "deploy", "triage", "--job", &v1, "--round", "1"]);
    v1
}

/// Two watched parties, an administrator's deployment (1) of a weak model,
/// then a one-iteration pipeline whose coordinator exits at the fault point
/// `at` and is started again: the federation, the pipeline's final status
/// and the first job's id.
fn pipeline_killed_at(at: &str) -> (Federation, Value, String) {
    let (mut fed, names) = watched_federation(2, 170);
    let watched = |n: &str| format!("[datasets.watched]\npath = \"batches/{n}\"\n");
    for n in &names {
        fed.start_party(n, &watched(n));
    }
    let v1 = deploy_a_weak_first_version(&fed, &names);
    fed.kill_coordinator();
    fed.coordinator_env = vec![("CONFIDE_COORDINATOR_EXIT_AT".into(), at.into())];
    fed.start_coordinator();
    let p = fed.submit("pipeline.toml", &pipeline_spec(&names, 0.0, 1));
    let status = fed.wait_coordinator_exit(180);
    assert_eq!(status.code(), Some(3), "{}", fed.logs());
    fed.coordinator_env.clear();
    fed.start_coordinator();
    let st = fed.wait_for(&p, 240, "the pipeline to end", |s| s["state"] != "running");
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    (fed, st, v1)
}

#[test]
fn a_pipeline_retrains_gates_deploys_survives_a_restart_and_rolls_back_a_worse_version() {
    let (mut fed, names) = watched_federation(2, 170);
    let watched = |n: &str| format!("[datasets.watched]\npath = \"batches/{n}\"\n");
    let serve = "[serve]\nservices = [\"triage\"]\nlisten = \"127.0.0.1:0\"\n";
    fed.start_party("site-0", &format!("{}{serve}", watched("site-0")));
    fed.start_party("site-1", &watched("site-1"));
    let addr = fed.party_endpoint("site-0");

    // A barely trained first version, deployed by the administrator.
    let v1 = deploy_a_weak_first_version(&fed, &names);
    wait_for_sequence(&fed, addr, "triage", 1);

    // The pipeline: its first count finds batch 001 new (170 rows a party),
    // trains from version 1, and the gate passes.
    let p = fed.submit("pipeline.toml", &pipeline_spec(&names, 0.0, 2));
    let st = fed.wait_for(&p, 180, "iteration 1 to deploy", |s| {
        iteration(s, 0)["outcome"] != "running" && iteration(s, 0)["outcome"].is_string()
    });
    let it1 = iteration(&st, 0);
    assert_eq!(it1["outcome"], "deployed", "{st:#}\n{}", fed.logs());
    assert_eq!(it1["new_rows"], 340, "{it1:#}");
    assert!(it1["trigger"].as_str().unwrap_or("").contains("340 new rows"), "{it1:#}");
    assert!(it1["gate"].as_str().unwrap_or("").starts_with("passed"), "{it1:#}");
    assert!(it1["candidate_metric"].as_f64() >= it1["deployed_metric"].as_f64(), "{it1:#}");
    assert!(it1["trigger_to_deploy_ms"].as_u64().is_some_and(|ms| ms > 0), "{it1:#}");
    assert_eq!(it1["deployed_sequence"], 2);
    // The serving party verified the coordinator's deployment under the
    // administrator's grant, pulled it and serves it.
    let served = wait_for_sequence(&fed, addr, "triage", 2);
    assert_eq!(served["version"]["job_id"], it1["candidate_job"], "{served:#}");
    let services = fed.run_ok(&["model", "services", "triage", "--json"]);
    assert!(services.contains(&format!("\"{p}\"")), "the history names the pipeline: {services}");
    let text = fed.run_ok(&["job", "status", &p]);
    assert!(text.contains("iteration 1: deployed") && text.contains("gate:      passed"), "{text}");

    // Without new rows nothing happens; the status survives a restart and
    // the pipeline goes on from where it was.
    fed.kill_coordinator();
    fed.start_coordinator();
    let st = fed.wait_for(&p, 60, "the pipeline to wait again", |s| {
        s["pipeline_phase"].as_str().is_some_and(|ph| ph.starts_with("waiting for new rows (iteration 2)"))
    });
    assert_eq!(iteration(&st, 0)["outcome"], "deployed", "{st:#}");
    assert_eq!(st["state"], "running");

    // A corrupted batch (labels flipped) arrives: on it, version 2 scores
    // below version 1, so the pipeline rolls back before it retrains.
    for n in &names {
        drop_batch(&fed.path(&format!("batches/{n}")), "002.csv", &rows(&fed, n, 170..284, true));
    }
    let st = fed.wait_for(&p, 240, "the pipeline to end", |s| s["state"] != "running");
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let it2 = iteration(&st, 1);
    assert!(it2["check"].as_str().unwrap_or("").contains("rolled back"), "{it2:#}");
    let history = service_history(&fed);
    let rollback = history.iter().find(|d| d["sequence"] == 3).expect("deployment 3");
    assert_eq!(
        (rollback["action"].as_str(), rollback["job_id"].as_str(), rollback["round"].as_u64()),
        (Some("rollback"), Some(v1.as_str()), Some(1)),
        "{rollback:#}"
    );
    assert_eq!(
        (rollback["pipeline"]["job"].as_str(), rollback["pipeline"]["iteration"].as_u64()),
        (Some(p.as_str()), Some(2))
    );
    // After the rollback the iteration retrained from version 1; its gate
    // decided whether a fourth deployment followed.
    let newest = if it2["outcome"] == "deployed" { 4 } else { 3 };
    assert_eq!(history.iter().map(|d| d["sequence"].as_u64().unwrap_or(0)).max(), Some(newest), "{it2:#}");
    wait_for_sequence(&fed, addr, "triage", newest);

    // The administrator deploys iteration 1's candidate (a good model)
    // again, and a pipeline whose training shrinks every weight (a heavy L2
    // penalty) produces a worse candidate, which its gate refuses: the
    // good model stays.
    // The hospitals drop the corrupted batch first (a batch removed is no
    // longer read).
    for n in &names {
        std::fs::remove_file(fed.path(&format!("batches/{n}/002.csv"))).expect("remove the corrupted batch");
    }
    let good = it1["candidate_job"].as_str().expect("candidate job").to_owned();
    fed.run_ok(&["model", "deploy", "triage", "--job", &good, "--round", "3"]);
    let good_seq = newest + 1;
    wait_for_sequence(&fed, addr, "triage", good_seq);
    let shrink = pipeline_spec(&names, 0.0, 1)
        .replace("learning_rate = 0.1", "learning_rate = 0.1\nl2 = 5.0")
        .replace("metric = \"accuracy\"", "metric = \"loss\"");
    let worse = fed.submit("worse.toml", &shrink);
    let st = fed.wait_for(&worse, 240, "the second pipeline to end", |s| s["state"] != "running");
    let it = iteration(&st, 0);
    assert_eq!((st["state"].as_str(), it["outcome"].as_str()), (Some("succeeded"), Some("kept")), "{st:#}");
    assert!(it["candidate_metric"].as_f64() > it["deployed_metric"].as_f64(), "a worse (higher) loss: {it:#}");
    assert!(it["gate"].as_str().unwrap_or("").starts_with("refused"), "{it:#}");
    assert!(it["deployed_sequence"].is_null(), "{it:#}");
    let (status, health) = http::get(addr, "GET", "/healthz", "");
    let served = &health["services"]["triage"]["version"];
    assert_eq!(
        (status, served["sequence"].as_u64(), served["job_id"].as_str()),
        (200, Some(good_seq), Some(good.as_str()))
    );

    // A gate asking for a whole point of accuracy keeps what is deployed too.
    let strict = fed.submit("strict.toml", &pipeline_spec(&names, 1.0, 1));
    let st = fed.wait_for(&strict, 240, "the strict pipeline to end", |s| s["state"] != "running");
    let it = iteration(&st, 0);
    assert_eq!(it["outcome"], "kept", "{st:#}");
    assert!(it["gate"].as_str().unwrap_or("").contains("< min_delta 1"), "{it:#}");
}

fn dp_spec(names: &[String], kind: &str, extra: &str) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "name = \"dp pipeline\"\nkind = \"{kind}\"\nrounds = 2\n[parties]\nnames = [{}]\nmin = 2\ndataset = \"watched\"\n\
         [model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n[training]\nlocal_epochs = 1\n\
         batch_size = 8\nlearning_rate = 0.05\nseed = 3\n[dp]\nnoise_multiplier = 1.5\nsampling_rate = 0.05\n\
         delta = 1e-5\n[timeouts]\nrecruit_secs = 30\nround_secs = 30\n{extra}",
        names.join(", ")
    )
}

/// A pipeline whose grant's administrator is revoked (a key compromised)
/// starts no further iteration: it pauses, saying why, and a new
/// administrator certificate can cancel it.
#[test]
fn a_pipeline_pauses_once_its_grants_administrator_is_revoked() {
    let (fed, _, v1, p) = pipeline_on_a_deployment();
    let admin = fed.s("pki/admin.pem");
    fed.run_ok(&["certs", "revoke", "--ca", &fed.s("pki"), "--admin", "--cert", &admin, "confide-admin"]);
    fed.wait_for_log("revocation list updated", 20);
    // A new administrator certificate reads the status; the grant stays the
    // revoked one's.
    fed.run_ok(&["certs", "issue", "--dir", &fed.s("pki"), "--admin"]);
    let (_, phase) = paused_phase(&fed, &p);
    assert!(phase.contains("grant no longer holds") && phase.contains("revoked"), "{phase}\n{}", fed.logs());
    let out = fed.run_ok(&["job", "cancel", &p]);
    assert!(out.contains("cancelled"), "{out}");
    // The history the revoked certificate signed (a compromised key's, it
    // may be forged) only numbers what comes next: no rollback returns to
    // it, but the new certificate deploys on top of it, with a warning.
    let out = fed.cli(&["model", "rollback", "triage"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("revoked since; a rollback does not build on it"), "{err}");
    let out = fed.cli(&["model", "deploy", "triage", "--job", &v1, "--round", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("revoked since"), "{err}");
    // Undoing that deployment would return to the revoked one's: refused.
    let out = fed.cli(&["model", "rollback", "triage"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("revoked since; a rollback does not build on it"), "{err}");
}

/// A grant is signed over the service's history as it stood: once an
/// administrator deploys after it (say, rolls a pipeline's model back), the
/// pipeline pauses, saying why, instead of undoing that deployment (parties
/// would refuse its deployments too); a pipeline submitted with a grant
/// older than the current deployment is refused.
#[test]
fn a_pipeline_pauses_once_an_administrator_deploys_after_its_grant() {
    let (fed, names, v1, p) = pipeline_on_a_deployment();
    fed.run_ok(&["model", "deploy", "triage", "--job", &v1, "--round", "1"]);
    let (_, phase) = paused_phase(&fed, &p);
    assert!(phase.contains("an administrator deployed") && phase.contains("after the grant"), "{phase}");
    fed.run_ok(&["job", "cancel", &p]);
    // A grant signed after deployment 1 (before the administrator's 2) is
    // refused at submission; the CLI signs one after 2, which is taken.
    let pki = confide_crypto::pki::PkiDir::new(fed.path("pki"));
    let (akey, acert, admin) = confide_proto::deploy::admin_signer(&pki).expect("admin");
    let spec = pipeline_spec(&names, -1.0, 5);
    let logreg = "kind = \"logistic_regression\"\nclasses = 2\n";
    let stale = confide_proto::deploy::PipelineGrant { after_sequence: 1, ..grant_of(&admin, "triage", &spec, logreg) };
    let stale = confide_proto::deploy::SignedGrant::sign(stale, &akey, acert).expect("grant");
    let e = &refusals(&fed, vec![submission(&spec, Some(stale))])[0];
    assert!(e.contains("an administrator deployed 2") && e.contains("sign the grant again"), "{e}");
    let again = fed.submit("pipeline.toml", &spec);
    let st = fed.wait_for(&again, 60, "the new pipeline to start", |s| s["pipeline_phase"].as_str().is_some());
    let phase = st["pipeline_phase"].as_str().unwrap_or("");
    assert!(!phase.contains("after the grant"), "{phase}");
    fed.run_ok(&["job", "cancel", &again]);
}

/// Under DP each iteration's training job is charged to every party's
/// ledger before it touches the data; when a party's budget cannot pay for
/// the next one, the pipeline pauses, naming the party and its ledger.
#[test]
fn a_dp_pipeline_pauses_when_a_partys_budget_would_be_exceeded() {
    let (mut fed, names) = watched_federation(2, 170);
    let first = dp_spec(&names, "train", "");
    let spec =
        confide_proto::jobspec::JobSpec::parse(&first, "dp.toml", &confide_proto::Limits::default()).expect("spec");
    let cost = spec.dp.as_ref().expect("dp").epsilon(&spec.training, spec.rounds);
    // Room for the first version and one iteration, not two.
    let budget = 2.5 * cost;
    for n in &names {
        let serve = if n == "site-0" { "[serve]\nservices = [\"triage\"]\n" } else { "" };
        let extra = format!(
            "[datasets.watched]\npath = \"batches/{n}\"\nfeatures = 30\n[policy]\naggregation = [\"none\"]\nmax_epsilon = {budget}\n\
             evaluations_outside_budget = true\n{serve}"
        );
        fed.start_party(n, &extra);
    }
    let v1 = fed.submit("first.toml", &first);
    assert_eq!(fed.wait_done(&v1, 120)["state"], "succeeded", "{}", fed.logs());
    fed.run_ok(&["model", "deploy", "triage", "--job", &v1, "--round", "2"]);
    let inc = "[incremental]\nservice = \"triage\"\nmin_new_rows = 100\npoll_secs = 0.3\nmin_delta = -1.0\n";
    let p = fed.submit("pipeline.toml", &dp_spec(&names, "incremental", inc));
    let st =
        fed.wait_for(&p, 180, "iteration 1", |s| iteration(s, 0)["outcome"].as_str().is_some_and(|o| o != "running"));
    assert_eq!(iteration(&st, 0)["outcome"], "deployed", "{st:#}\n{}", fed.logs());
    for n in &names {
        drop_batch(&fed.path(&format!("batches/{n}")), "002.csv", &rows(&fed, n, 170..284, false));
    }
    let (st, phase) = paused_phase(&fed, &p);
    assert!(phase.contains("party site-") && phase.contains("has spent ε"), "{phase}");
    assert_eq!(
        (st["state"].as_str(), iteration(&st, 1)["outcome"].as_str()),
        (Some("running"), Some("paused")),
        "{st:#}"
    );
    // The ledger charged two jobs, not three.
    let ledger = std::fs::read_to_string(fed.path("pki/parties/site-1.ledger.json")).expect("ledger");
    let charged: Value = serde_json::from_str(&ledger).expect("ledger JSON");
    assert_eq!(charged["datasets"]["watched"]["jobs"].as_object().map(|j| j.len()), Some(2), "{charged:#}");
    let out = fed.run_ok(&["job", "cancel", &p]);
    assert!(out.contains("cancelled"), "{out}");
}

/// The coordinator starts a pipeline only with an administrator's grant for
/// exactly the spec submitted, its service and its architecture.
#[test]
fn a_pipeline_is_refused_without_a_matching_administrators_grant() {
    use confide_proto::deploy::{PipelineGrant, SignedGrant, admin_signer};
    let (fed, names) = watched_federation(2, 10);
    let spec = pipeline_spec(&names, 0.0, 1);
    let pki = confide_crypto::pki::PkiDir::new(fed.path("pki"));
    let (akey, acert, admin) = admin_signer(&pki).expect("admin");
    let grant = |service: &str, text: &str, architecture: &str| grant_of(&admin, service, text, architecture);
    let logreg = "kind = \"logistic_regression\"\nclasses = 2\n";
    let for_years = {
        let g = grant("triage", &spec, logreg);
        PipelineGrant { expires_at: g.issued_at + 400 * 86_400, ..g }
    };
    let party_key =
        confide_crypto::identity::IdentityKey::from_pem(&std::fs::read(pki.party_key("site-0")).expect("key"))
            .expect("key");
    let party_cert = confide_proto::net::load_certs(&pki.party_cert("site-0")).expect("cert")[0].to_vec();
    let signed = |g: PipelineGrant| Some(SignedGrant::sign(g, &akey, acert.clone()).expect("grant"));
    let mlp = "kind = \"mlp\"\nclasses = 2\nhidden = [4]\n";
    let cases: Vec<(Option<SignedGrant>, &str)> = vec![
        (None, "needs the administrator's grant"),
        (signed(grant("triage", "another spec", logreg)), "another spec"),
        (signed(grant("billing", &spec, logreg)), "for service billing"),
        (signed(grant("triage", &spec, mlp)), "architecture"),
        (
            Some(SignedGrant::sign(grant("triage", &spec, logreg), &party_key, party_cert).expect("grant")),
            "grant signature",
        ),
        (signed(for_years), "at most 366 days"),
    ];
    // A train job carries no grant.
    let train = job_spec(&names, 2, 1, "kind = \"logistic_regression\"\nclasses = 2", "seed = 1");
    let train_with_grant = confide_proto::pb::SubmitJobRequest {
        file_name: "train.toml".into(),
        ..submission(&train, signed(grant("triage", &train, logreg)))
    };
    let expected: Vec<&str> =
        cases.iter().map(|(_, e)| *e).chain(["only an incremental pipeline carries a grant"]).collect();
    let requests = cases.into_iter().map(|(g, _)| submission(&spec, g)).chain([train_with_grant]).collect();
    let refused = refusals(&fed, requests);
    assert_eq!(refused.len(), expected.len());
    for (e, expected) in refused.iter().zip(expected) {
        assert!(e.contains(expected), "{expected}: {e}");
    }
}

/// Under secure aggregation every job of the pipeline goes through it: the
/// parties accept only `secagg` jobs, so the count of new rows and the
/// gate's metrics reach the coordinator only as sums.
#[test]
fn a_pipeline_under_secure_aggregation_counts_and_gates_through_secure_sums() {
    let (mut fed, names) = watched_federation(3, 120);
    for n in &names {
        let serve = if n == "site-0" { "[serve]\nservices = [\"triage\"]\n" } else { "" };
        let extra =
            format!("[datasets.watched]\npath = \"batches/{n}\"\n[policy]\naggregation = [\"secagg\"]\n{serve}");
        fed.start_party(n, &extra);
    }
    let secagg = "[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\nclip = 4.0\n";
    let first =
        job_spec(&names, 3, 1, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlearning_rate = 0.00001")
            .replace("dataset = \"data\"", "dataset = \"watched\"")
            + secagg;
    let v1 = fed.submit("first.toml", &first);
    assert_eq!(fed.wait_done(&v1, 120)["state"], "succeeded", "{}", fed.logs());
    fed.run_ok(&["model", "deploy", "triage", "--job", &v1, "--round", "1"]);
    let spec = pipeline_spec(&names, 0.0, 1).replace("min = 2", "min = 3") + secagg;
    let p = fed.submit("pipeline.toml", &spec);
    let st = fed.wait_for(&p, 240, "the pipeline to end", |s| s["state"] != "running");
    let it = iteration(&st, 0);
    assert_eq!(
        (st["state"].as_str(), it["outcome"].as_str()),
        (Some("succeeded"), Some("deployed")),
        "{st:#}\n{}",
        fed.logs()
    );
    assert_eq!(it["new_rows"], 360, "the secure sum of the parties' new rows: {it:#}");
    let count = it["trigger"].as_str().and_then(|t| t.split("count job ").nth(1)).map(|j| j.trim_end_matches(')'));
    let count = fed.status(count.expect("count job"));
    assert_eq!(count["privacy"]["aggregation"], "secagg", "{count:#}");
    assert!(count["history"][0]["participants"].as_array().is_some_and(|p| p.len() == 3), "{count:#}");
}
