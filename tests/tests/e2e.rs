//! End-to-end tests: real `confide` and `confide-party` processes on loopback
//! over mutual TLS.

use std::path::PathBuf;

use confide_algorithms::Parameters;
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_tests::{Federation, independent_fedavg, job_spec, max_abs_diff, repo_root, standardised_start};

const LOGREG2: &str = "kind = \"logistic_regression\"\nclasses = 2";
const LOGREG10: &str = "kind = \"logistic_regression\"\nclasses = 10";

fn breast_cancer() -> PathBuf {
    repo_root().join("examples/data/breast_cancer.csv")
}

fn digits() -> PathBuf {
    repo_root().join("examples/data/digits.csv.gz")
}

fn three() -> Vec<&'static str> {
    vec!["hospital-a", "hospital-b", "hospital-c"]
}

fn names() -> Vec<String> {
    three().into_iter().map(String::from).collect()
}

#[test]
fn fedavg_job_equals_the_independently_computed_weighted_mean() {
    let mut fed = Federation::new(&three(), &breast_cancer(), true, "5,3,2");
    fed.start_coordinator();
    fed.start_parties();
    let text = job_spec(&fed.names, 3, 3, LOGREG2, "local_epochs = 2\nlearning_rate = 0.05\nseed = 11");
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["rounds_completed"], 3);
    assert_eq!(st["history"].as_array().map(Vec::len), Some(3));
    assert_eq!(st["history"][2]["participants"], serde_json::json!(["hospital-a", "hospital-b", "hospital-c"]));
    assert!(st["metrics"]["accuracy"].as_f64().is_some_and(|a| a > 0.9), "{st:#}");
    let model = Parameters::from_safetensors(&fed.model(&id)).expect("model");

    // The same computation without the federation: each party's trainer is
    // rebuilt from the spec and its data file, and the example-weighted mean
    // is taken here by hand.
    let spec = JobSpec::parse(&text, "job.toml", &Limits::default()).expect("spec");
    let mut trainers = fed.trainers(|data, n| BuiltinTrainers::default().build(&spec, data, n).expect("trainer"));
    let global = standardised_start(&trainers);
    let global = independent_fedavg(&mut trainers, global, &spec.training, 3);
    let max_diff = max_abs_diff(&model, &global);
    assert!(max_diff <= 1e-5, "federated model differs from the independent weighted mean by {max_diff}");
    // The model is not trivially the initial one.
    assert!(model.get("linear.weight").expect("weight").data.iter().any(|v| v.abs() > 0.05));
}

#[test]
fn a_party_killed_mid_job_is_dropped_and_the_rounds_go_on() {
    let mut fed = Federation::new(&three(), &digits(), false, "1,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let id = fed.submit("job.toml", &job_spec(&fed.names, 2, 500, LOGREG10, "local_epochs = 3\nseed = 5"));
    fed.wait_for(&id, 60, "two rounds", |s| s["rounds_completed"].as_u64() >= Some(2));
    fed.kill_party("hospital-c");
    let st = fed.wait_for(&id, 60, "rounds without hospital-c", |s| {
        let h = s["history"].as_array().cloned().unwrap_or_default();
        let dropped_at = h.iter().position(|r| r["dropped"].get("hospital-c").is_some());
        dropped_at.is_some_and(|i| h.len() > i + 1) || s["state"] != "running"
    });
    assert_eq!(st["state"], "running", "{st:#}\n{}", fed.logs());
    let last = st["history"].as_array().and_then(|h| h.last()).cloned().unwrap_or_default();
    assert_eq!(last["participants"], serde_json::json!(["hospital-a", "hospital-b"]));
    assert_eq!(st["parties"]["hospital-c"]["state"], "dropped");
    fed.run_ok(&["job", "cancel", &id]);
    assert_eq!(fed.wait_done(&id, 30)["state"], "cancelled");
}

#[test]
fn below_the_minimum_the_job_fails_naming_the_missing_party() {
    let mut fed = Federation::new(&three(), &digits(), false, "1,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let id = fed.submit("job.toml", &job_spec(&fed.names, 3, 500, LOGREG10, "local_epochs = 3\nseed = 5"));
    fed.wait_for(&id, 60, "two rounds", |s| s["rounds_completed"].as_u64() >= Some(2));
    fed.kill_party("hospital-b");
    let st = fed.wait_done(&id, 60);
    assert_eq!(st["state"], "failed", "{st:#}");
    let err = st["error"].as_str().unwrap_or_default();
    assert!(err.contains("hospital-b") && err.contains("needs 3"), "{err}");
}

/// Runs `text` once uninterrupted, then again with the coordinator killed
/// (SIGKILL) and restarted after `kill_after` rounds while the parties are
/// frozen mid-round; returns both final models and the resumed job's status.
fn run_twice_with_a_kill(text: &str, kill_after: u64) -> (Parameters, Parameters, serde_json::Value) {
    let mut fed = Federation::new(&three(), &digits(), false, "2,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let a = fed.submit("a.toml", text);
    assert_eq!(fed.wait_done(&a, 120)["state"], "succeeded");
    let model_a = Parameters::from_safetensors(&fed.model(&a)).expect("model a");

    let b = fed.submit("b.toml", text);
    fed.wait_for(&b, 60, "some rounds", |s| s["rounds_completed"].as_u64() >= Some(kill_after));
    fed.signal_parties("STOP");
    let before = fed.status(&b);
    assert_eq!(before["state"], "running", "the job ended before the kill; make it longer: {before:#}");
    fed.kill_coordinator();
    fed.start_coordinator();
    fed.signal_parties("CONT");
    let st = fed.wait_done(&b, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert!(fed.coordinator_log().contains("resuming job from its checkpoint"));
    let model_b = Parameters::from_safetensors(&fed.model(&b)).expect("model b");
    (model_a, model_b, st)
}

/// A job whose checkpoint cannot be read after a restart fails, naming why,
/// and the coordinator starts all the same: the other job resumes (one
/// damaged file used to stop the whole coordinator from starting: found by
/// review).
#[test]
fn a_job_whose_checkpoint_cannot_be_read_fails_alone_at_a_restart() {
    let mut fed = Federation::new(&three(), &digits(), false, "2,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let text = job_spec(&names(), 3, 14, LOGREG10, "local_epochs = 3\nseed = 9\nlearning_rate = 0.05");
    let a = fed.submit("a.toml", &text);
    let b = fed.submit("b.toml", &text);
    for id in [&a, &b] {
        fed.wait_for(id, 60, "a round", |s| s["rounds_completed"].as_u64() >= Some(1));
    }
    fed.signal_parties("STOP");
    assert!([&a, &b].iter().all(|id| fed.status(id)["state"] == "running"), "a job ended before the kill");
    fed.kill_coordinator();
    // Every model file of job b's damaged.
    for entry in std::fs::read_dir(fed.path(&format!("coordinator/models/{b}"))).expect("b's models") {
        let path = entry.expect("entry").path();
        if path.to_string_lossy().ends_with(".safetensors") {
            std::fs::write(&path, b"not a model").expect("damage");
        }
    }
    fed.start_coordinator();
    fed.signal_parties("CONT");
    let st = fed.wait_done(&b, 60);
    assert_eq!(st["state"], "failed", "{st:#}");
    assert!(st["error"].as_str().unwrap_or_default().contains("cannot resume: its checkpoint of round"), "{st:#}");
    assert_eq!(fed.wait_done(&a, 120)["state"], "succeeded", "{}", fed.logs());
}

/// No checkpoint goes ahead of the parties' statuses it follows (an
/// exclusion the round made must be on disk before the round is, or a
/// restart between the two invites the excluded party back). The fault is
/// injected into the coordinator's database from outside: a trigger refuses
/// every party status of round 3 on, so the round-3 checkpoint must not be
/// written and the job fails naming why. (The periodic flush used to drop
/// statuses it failed to write, and the checkpoint after it went ahead:
/// found by this test.)
#[test]
fn a_round_whose_party_statuses_cannot_be_written_gets_no_checkpoint() {
    let mut fed = Federation::new(&three(), &digits(), false, "2,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let db = rusqlite::Connection::open(fed.path("coordinator/confide.db")).expect("the coordinator's database");
    db.busy_timeout(std::time::Duration::from_secs(10)).expect("timeout");
    db.execute_batch(
        "CREATE TRIGGER injected_update_fault BEFORE UPDATE OF last_round ON job_parties WHEN NEW.last_round >= 3
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END;
         CREATE TRIGGER injected_insert_fault BEFORE INSERT ON job_parties WHEN NEW.last_round >= 3
         BEGIN SELECT RAISE(ABORT, 'injected fault'); END;",
    )
    .expect("inject the fault");
    let id = fed.submit("job.toml", &job_spec(&names(), 3, 6, LOGREG10, "local_epochs = 1\nseed = 5"));
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "failed", "{st:#}\n{}", fed.logs());
    let err = st["error"].as_str().unwrap_or_default();
    assert!(err.contains("round 3: cannot save the checkpoint") && err.contains("injected fault"), "{err}");
    assert_eq!(st["rounds_completed"], 2, "{st:#}");
    assert_eq!(st["history"].as_array().map(Vec::len), Some(2), "{st:#}");
    let models = fed.path(&format!("coordinator/models/{id}"));
    assert!(models.join("round-00002.safetensors").exists(), "round 2's checkpoint is missing");
    assert!(!models.join("round-00003.safetensors").exists(), "round 3 was checkpointed without its statuses");
}

/// The rounds of `from`'s model that the coordinator's log says job `id`
/// started from, in order (once at submission, once at each resumption
/// before its first checkpoint).
fn start_rounds(fed: &Federation, id: &str, from: &str) -> Vec<u64> {
    let said = format!("starts from job {from}'s model of round ");
    fed.coordinator_log()
        .lines()
        .filter(|l| l.contains(id))
        .filter_map(|l| l.split_once(&said).map(|(_, rest)| rest))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// A job that starts from another's model and is resumed before its first
/// checkpoint starts from the same model again: the round recorded at
/// submission, not the other job's newest by then (a pipeline's training
/// starts from the deployed round, which may be an older one; before, a
/// restart silently trained from the newest).
#[test]
fn a_job_resumed_before_its_first_checkpoint_starts_from_the_same_model() {
    let mut fed = Federation::new(&three(), &digits(), false, "1,1,1");
    fed.start_coordinator();
    fed.start_party("hospital-a", "");
    fed.start_party("hospital-b", "");
    let two = ["hospital-a".to_string(), "hospital-b".to_string()];
    let a = fed.submit("a.toml", &job_spec(&two, 2, 400, LOGREG10, "local_epochs = 1\nseed = 5"));
    fed.wait_for(&a, 60, "two rounds", |s| s["rounds_completed"].as_u64() >= Some(2));
    // B needs hospital-c, which is not running yet: it waits in recruitment
    // while A goes on checkpointing newer models.
    let b_text = format!("from_job = \"{a}\"\n{}", job_spec(&names(), 3, 2, LOGREG10, "seed = 6"));
    let b = fed.submit("b.toml", &b_text);
    let started = start_rounds(&fed, &b, &a);
    assert_eq!(started.len(), 1, "{}", fed.coordinator_log());
    fed.wait_for(&a, 60, "newer rounds", |s| s["rounds_completed"].as_u64() >= Some(started[0] + 2));
    assert_eq!(fed.status(&b)["rounds_completed"], 0, "B went on before the restart");
    fed.kill_coordinator();
    fed.start_coordinator();
    fed.start_party("hospital-c", "");
    let st = fed.wait_done(&b, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(start_rounds(&fed, &b, &a), vec![started[0], started[0]], "{}", fed.coordinator_log());
    fed.run_ok(&["job", "cancel", &a]);
}

#[test]
fn a_restarted_coordinator_resumes_and_ends_with_the_same_model() {
    let text = job_spec(&names(), 3, 14, LOGREG10, "local_epochs = 3\nseed = 9\nlearning_rate = 0.05");
    let (model_a, model_b, st) = run_twice_with_a_kill(&text, 2);
    assert_eq!(st["history"].as_array().map(Vec::len), Some(14));
    assert_eq!(model_a, model_b, "the resumed job's model differs from the uninterrupted one");
}

#[test]
fn a_fedadam_job_resumed_after_sigkill_ends_with_the_uninterrupted_model() {
    // FedAdam carries moments from round to round: unless they are saved
    // with each checkpoint and restored, the resumed run drifts away.
    let text = job_spec(&names(), 3, 12, LOGREG10, "local_epochs = 2\nseed = 13\nlearning_rate = 0.05")
        + "[strategy]\nname = \"fedadam\"\nserver_learning_rate = 0.05\n";
    let (model_a, model_b, _) = run_twice_with_a_kill(&text, 3);
    assert_eq!(model_a, model_b, "the resumed FedAdam job's model differs from the uninterrupted one");
}

/// `confide-party check` names, before the party runs, what would make it
/// useless: a declared width its rows do not have (a DP job reads only rows
/// of that width, and would leave out every one, its ε charged all the
/// same), and a private key others can read (the party used to start and
/// retry its connection forever); `run` stops on the latter at start.
#[test]
fn party_check_names_a_width_the_rows_do_not_have_and_a_key_others_can_read() {
    let fed = Federation::new(&three(), &breast_cancer(), true, "1,1,1");
    let check = |cfg: &std::path::Path| {
        let out = std::process::Command::new(&fed.party_bin)
            .args(["check", "--config", cfg.to_str().expect("utf-8")])
            .output()
            .expect("run confide-party check");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let cfg = fed.party_config("hospital-a", "");
    let (code, said) = check(&cfg);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("data set data:") && said.contains("30 features"), "{said}");

    let text = std::fs::read_to_string(&cfg).expect("config");
    assert!(text.contains("features = 30\n"), "{text}");
    std::fs::write(&cfg, text.replace("features = 30\n", "features = 29\n")).expect("write");
    let (code, said) = check(&cfg);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("datasets.data.features = 29") && said.contains("hospital-a.csv"), "{said}");
    assert!(said.contains("leave out every row"), "{said}");
    std::fs::write(&cfg, text).expect("write");

    // The privacy ledger as `run` reads it: absent (a first start) is a
    // warning, unreadable fails the check naming the file.
    let (code, said) = check(&cfg);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("privacy ledger") && said.contains("does not exist"), "{said}");
    let ledger = fed.path("pki/parties/hospital-a.ledger.json");
    std::fs::write(&ledger, "{").expect("write");
    let (code, said) = check(&cfg);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("hospital-a.ledger.json") && said.contains("not a privacy ledger"), "{said}");
    std::fs::remove_file(&ledger).expect("rm");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = fed.path("pki/parties/hospital-a.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let (code, said) = check(&cfg);
        assert_eq!(code, Some(1), "{said}");
        assert!(
            said.contains("TLS identity") && said.contains("hospital-a.key") && said.contains("chmod 600"),
            "{said}"
        );
        let out = std::process::Command::new(&fed.party_bin)
            .args(["run", "--config", cfg.to_str().expect("utf-8")])
            .output()
            .expect("run confide-party run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("hospital-a.key") && err.contains("chmod 600"), "{err}");
    }
}

#[test]
fn malformed_job_specs_are_refused_with_every_field_named() {
    let mut fed = Federation::new(&["hospital-a", "hospital-b"], &breast_cancer(), true, "1,1");
    fed.start_coordinator();
    let bad = job_spec(&fed.names, 2, 0, "kind = \"logistic_regression\"\nclasses = 1", "batch_size = 0");
    let path = fed.path("bad.toml");
    std::fs::write(&path, bad).expect("write");
    let out = fed.cli(&["job", "submit", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for field in ["bad.toml: rounds:", "bad.toml: model.classes:", "bad.toml: training.batch_size:"] {
        assert!(err.contains(field), "missing {field:?} in: {err}");
    }
    let unknown = job_spec(&["hospital-a".into(), "hospital-z".into()], 1, 1, LOGREG2, "");
    std::fs::write(&path, unknown).expect("write");
    let out = fed.cli(&["job", "submit", path.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parties.names[1]") && err.contains("not enrolled"), "{err}");
    assert!(fed.run_ok(&["job", "list", "--json"]).trim() == "[]", "no bad job was stored");
}

#[test]
fn a_party_policy_refusal_is_shown_and_evaluate_jobs_reuse_a_model() {
    let mut fed = Federation::new(&three(), &breast_cancer(), true, "1,1,1");
    fed.start_coordinator();
    fed.start_party("hospital-a", "");
    fed.start_party("hospital-b", "");
    fed.start_party("hospital-c", "[policy]\njob_kinds = [\"evaluate\"]\n");
    let id = fed.submit("train.toml", &job_spec(&fed.names, 2, 2, LOGREG2, "seed = 1"));
    let st = fed.wait_done(&id, 60);
    assert_eq!(st["state"], "succeeded", "{st:#}");
    assert_eq!(st["parties"]["hospital-c"]["state"], "refused");
    let why = st["parties"]["hospital-c"]["detail"].as_str().unwrap_or_default();
    assert!(why.contains("policy forbids job kind \"train\""), "{why}");

    let eval = job_spec(&fed.names, 3, 1, LOGREG2, "seed = 1")
        .replace("kind = \"train\"", &format!("kind = \"evaluate\"\nfrom_job = \"{id}\""));
    let ev = fed.submit("eval.toml", &eval);
    let st = fed.wait_done(&ev, 60);
    assert_eq!(st["state"], "succeeded", "{st:#}");
    assert_eq!(st["history"][0]["participants"], serde_json::json!(["hospital-a", "hospital-b", "hospital-c"]));
    assert!(st["metrics"]["accuracy"].as_f64().is_some_and(|a| a > 0.85), "{st:#}");
    let list = fed.run_ok(&["job", "list"]);
    assert!(list.contains(&id) && list.contains(&ev), "{list}");
}
