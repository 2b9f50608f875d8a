//! Differential privacy end to end: real `confide` and `confide-party`
//! processes. Each hospital's ledger refuses what its budget does not allow
//! and never under-counts, even when the party is killed mid-job; the
//! coordinator's ε survives its own restart.

use std::path::PathBuf;

use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_tests::{Federation, repo_root};
use serde_json::Value;

fn three() -> Vec<&'static str> {
    vec!["hospital-a", "hospital-b", "hospital-c"]
}

/// A DP-SGD job (pure-Rust logistic regression) over the federation's parties.
fn dp_spec(protocol: &str, min: usize, rounds: u32, z: f64) -> String {
    format!(
        "name = \"dp\"\nkind = \"train\"\nrounds = {rounds}\n[parties]\nnames = [\"hospital-a\", \"hospital-b\", \
         \"hospital-c\"]\nmin = {min}\ndataset = \"data\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n\
         standardize = false\n[training]\nlocal_epochs = 1\nbatch_size = 8\nlearning_rate = 0.01\nseed = 3\n\
         validation_fraction = 0.0\n[dp]\nnoise_multiplier = {z}\nsampling_rate = 0.05\ndelta = 1e-5\n\
         [aggregation]\nprotocol = \"{protocol}\"\n[aggregation.{protocol}]\n{}\n[timeouts]\nrecruit_secs = 30\n\
         round_secs = 30\n",
        if protocol == "secagg" { "max_examples = 1" } else { "" }
    )
}

fn cost(text: &str) -> f64 {
    let spec = JobSpec::parse(text, "dp.toml", &Limits::default()).expect("spec");
    spec.dp.as_ref().expect("dp").epsilon(&spec.training, spec.rounds)
}

/// What a hospital's ledger charges for the spec: ε per record.
fn record_cost(text: &str) -> f64 {
    let spec = JobSpec::parse(text, "dp.toml", &Limits::default()).expect("spec");
    spec.dp.as_ref().expect("dp").record_epsilon(&spec.training, spec.rounds)
}

fn policy(max_epsilon: f64) -> String {
    format!("[policy]\naggregation = [\"none\", \"secagg\"]\nmax_epsilon = {max_epsilon}\n")
}

fn ledger(fed: &Federation, party: &str) -> Value {
    let cfg = fed.path(&format!("{party}.toml"));
    let out = std::process::Command::new(confide_tests::bin_dir().join("confide-party"))
        .args(["budget", "--config", cfg.to_str().expect("utf-8"), "--json"])
        .output()
        .expect("confide-party budget");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("budget JSON")
}

/// A running federation of the three hospitals, each with `policy`.
fn federation(policy: &str) -> Federation {
    let mut fed = Federation::new(&three(), &breast_cancer(), true, "1,1,1");
    fed.start_coordinator();
    for p in three() {
        fed.start_party(p, policy);
    }
    fed
}

/// A party-level DP job ran to its end: the status states the party-level ε
/// its spec costs, and each hospital's ledger charges the per-record ε,
/// which is higher (a record moves its party's clipped update by up to
/// twice the clip), or, under adaptive clipping, the same (whose
/// party-level ε is accounted at twice the clip already: a party with no
/// data still sends its count coordinate).
fn assert_party_level_costs(fed: &Federation, id: &str, text: &str, st: &Value) {
    assert_party_level_costs_with(fed, id, text, st, false);
}

/// [`assert_party_level_costs`]; with `reruns`, each ledger holds at least
/// the per-record ε (a round a coordinator restart interrupted may run
/// again, and is charged again).
fn assert_party_level_costs_with(fed: &Federation, id: &str, text: &str, st: &Value, reruns: bool) {
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["privacy"]["dp"], "party");
    let total = cost(text);
    assert!((st["privacy"]["epsilon"].as_f64().expect("epsilon") - total).abs() < 1e-9, "{st:#}");
    let per_record = record_cost(text);
    if text.contains("adaptive_clip_quantile") {
        assert_eq!(per_record, total);
    } else {
        assert!(per_record > total * 1.5, "{per_record} vs {total}");
    }
    // The status says what each ledger charges a record.
    let shown = st["privacy"]["record_epsilon"].as_f64().expect("record_epsilon");
    assert!((shown - per_record).abs() < 1e-9 * per_record, "{shown} vs {per_record}: {st:#}");
    for p in three() {
        let l = ledger(fed, p);
        let charged = l["datasets"]["data"]["jobs"][id]["epsilon"].as_f64();
        if reruns {
            assert!(charged >= Some(per_record * (1.0 - 1e-12)), "{p}: {l:#}");
        } else {
            assert_eq!(charged, Some(per_record), "{p}: {l:#}");
        }
    }
}

fn breast_cancer() -> PathBuf {
    repo_root().join("examples/data/breast_cancer.csv")
}

/// hospital-c's budget is below the job's cost: it refuses, with the reason
/// in the job's status, and the others train. hospital-b is then killed
/// (SIGKILL) mid-job: its ledger still holds the whole job's cost and every
/// round it started. hospital-a, told that the job failed, keeps what its
/// started rounds cost: a second job that would take it past its budget is
/// refused with what it has spent, and one that fits in what the
/// settlement gave back is accepted.
#[test]
fn the_ledger_refuses_over_budget_jobs_and_survives_a_sigkill_without_under_counting() {
    let mut fed = Federation::new(&three(), &breast_cancer(), true, "1,1,1");
    fed.start_coordinator();
    let text = dp_spec("none", 2, 400, 2.0);
    let eps = cost(&text);
    assert!(eps.is_finite() && eps > 0.5, "{eps}");
    fed.start_party("hospital-a", &policy(eps * 1.5));
    fed.start_party("hospital-b", &policy(eps * 1.5));
    fed.start_party("hospital-c", &policy(eps * 0.5));
    let id = fed.submit("dp.toml", &text);
    let st = fed.wait_for(&id, 60, "three rounds", |s| s["rounds_completed"].as_u64() >= Some(3));
    let refused = st["parties"]["hospital-c"]["detail"].as_str().unwrap_or_default().to_string();
    assert!(refused.contains("would cost") && refused.contains("data"), "{st:#}");
    assert_eq!(st["privacy"]["dp"], "example");
    assert_eq!(st["privacy"]["accountant"], "rdp");
    fed.kill_party("hospital-b");
    // Every round hospital-b contributed to was on record before its update was sent.
    let seen = fed.status(&id);
    let contributed = seen["history"]
        .as_array()
        .map(|h| {
            h.iter().filter(|r| r["participants"].as_array().is_some_and(|p| p.contains(&"hospital-b".into()))).count()
        })
        .unwrap_or_default() as u64;
    assert!(contributed >= 3, "{seen:#}");
    let b = ledger(&fed, "hospital-b");
    let job = &b["datasets"]["data"]["jobs"][&id];
    assert_eq!(job["epsilon"].as_f64(), Some(eps), "the whole job stays reserved: {b:#}");
    assert!(job["rounds_started"].as_u64() >= Some(contributed), "{contributed} rounds contributed: {b:#}");
    assert!(b["datasets"]["data"]["epsilon"].as_f64() >= Some(eps), "{b:#}");
    // hospital-c spent nothing.
    assert_eq!(ledger(&fed, "hospital-c")["datasets"]["data"]["epsilon"].as_f64(), Some(0.0));
    // Renamed in hospital-b's configuration, the data set keeps what its
    // rows spent: `budget` shows the old name's spending against the new.
    let cfg = fed.path("hospital-b.toml");
    let text_b = std::fs::read_to_string(&cfg).expect("hospital-b's config");
    std::fs::write(&cfg, text_b.replace("[datasets.data]", "[datasets.renamed]")).expect("renamed");
    let renamed = ledger(&fed, "hospital-b");
    let row = &renamed["datasets"]["renamed"];
    let spent = b["datasets"]["data"]["epsilon"].as_f64();
    assert_eq!((row["epsilon"].as_f64(), row["rows_epsilon"].as_f64()), (Some(0.0), spent), "{renamed:#}");
    assert_eq!(row["also_as"], serde_json::json!(["data"]), "{renamed:#}");
    std::fs::write(&cfg, text_b).expect("restored");
    // Below its minimum without hospital-b, the job fails.
    assert_eq!(fed.wait_done(&id, 60)["state"], "failed");

    // hospital-a, told the job ended, keeps on record what the rounds it
    // started cost, no longer the whole job (hospital-b, killed, was never
    // told: it keeps the whole reservation, above).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let settled = loop {
        let a = ledger(&fed, "hospital-a");
        let job = a["datasets"]["data"]["jobs"][&id].clone();
        if job["ended"] == "failed" {
            break job;
        }
        assert!(std::time::Instant::now() < deadline, "hospital-a's reservation was not settled: {a:#}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let spec = JobSpec::parse(&text, "dp.toml", &Limits::default()).expect("spec");
    let dp = spec.dp.as_ref().expect("dp");
    let started = settled["rounds_started"].as_u64().expect("rounds_started") as u32;
    let spent = dp.record_epsilon(&spec.training, started);
    assert!((3..400).contains(&started), "{settled:#}");
    assert_eq!(settled["epsilon"].as_f64(), Some(spent), "{settled:#}");
    assert_eq!(settled["rounds_reserved"].as_u64(), Some(u64::from(started)), "{settled:#}");
    assert!(spent < eps, "{spent} vs {eps}");
    // The same job over `r` rounds (a party alone may run it).
    let over = |r: u32| text.replace("rounds = 400", &format!("rounds = {r}")).replace("min = 2", "min = 1");
    let budget = eps * 1.5;
    let fewest_costing_more = |limit: f64| (1..=4000u32).find(|&r| cost(&over(r)) > limit).expect("rounds");
    // hospital-a's remaining budget, budget − spent, refuses one that costs
    // more (it says what it has spent)...
    let refused = fewest_costing_more(budget - spent);
    assert!(cost(&over(refused)) <= budget, "a job refused for what was spent, not for its own cost");
    let second = fed.submit("dp2.toml", &over(refused));
    let st = fed.wait_done(&second, 60);
    let why = st["parties"]["hospital-a"]["detail"].as_str().unwrap_or_default();
    assert!(why.contains("has spent"), "{st:#}");
    assert_ne!(st["state"], "succeeded");
    // ...and takes one that fits in it, which the whole reservation (0.5·eps
    // left) would not have let through.
    let fits = refused - 1;
    assert!(cost(&over(fits)) > budget - eps, "{}: not beyond the unsettled budget", cost(&over(fits)));
    let third = fed.submit("dp3.toml", &over(fits));
    fed.wait_for(&third, 60, "hospital-a to train", |s| s["parties"]["hospital-a"]["last_round"].as_u64() >= Some(1));
    fed.run_ok(&["job", "cancel", &third]);
}

/// A DP job sets up whether or not any row of a party's data set is valid
/// (here the spec gives two feature ranges for 30 features, so every row
/// is dropped): it trains on none, says how many rows were dropped only in
/// the party's log, and is charged. A DP job that cannot be set up on the
/// data set (here a file that cannot be read) tells the coordinator only
/// that: the reason stays in the party's log, and the reservation stands.
#[test]
fn a_dp_job_that_fails_to_set_up_on_the_data_says_why_only_in_the_partys_log() {
    let fed = federation(&policy(100.0));
    // The data sets declare 30 features: ranges of another count are refused
    // at the offer, so these parties read the spec's width alone.
    for p in three() {
        let cfg = fed.path(&format!("{p}.toml"));
        let text = std::fs::read_to_string(&cfg).expect("config");
        assert!(text.contains("features = 30\n"), "{text}");
    }
    let text = dp_spec("none", 3, 2, 2.0)
        .replace("standardize = false", "standardize = true")
        .replace("[dp]\n", "[dp]\nfeature_ranges = [[0, 1], [0, 1]]\n");
    assert!(text.contains("feature_ranges"), "{text}");
    // Every party connected first, so each one's own refusal is recorded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !three().iter().all(|p| fed.coordinator_log().lines().any(|l| l.contains("party connected") && l.contains(p)))
    {
        assert!(std::time::Instant::now() < deadline, "parties did not connect:\n{}", fed.logs());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let id = fed.submit("dp-mismatch.toml", &text);
    let st = fed.wait_done(&id, 60);
    // Refused at the offer, saying why (recruiting stops at the first
    // refusal that leaves too few parties).
    let refusals = three()
        .iter()
        .filter(|p| st["parties"][*p]["detail"].as_str().is_some_and(|d| d.contains("declares 30 features")))
        .count();
    assert!(refusals >= 1 && st["state"] != "succeeded", "{st:#}");
    let text = text.replace("feature_ranges = [[0, 1], [0, 1]]\n", "");
    let text = text.replace("standardize = true", "standardize = false");
    // hospital-a's rows of another width (two features) are all dropped:
    // it trains on none, like a party that has no rows.
    let a = fed.path("data/hospital-a.csv");
    let narrow: String = (0..50).map(|i| format!("{},{},{}\n", i, i * 2, i % 2)).collect();
    std::fs::write(&a, narrow).expect("narrow rows");
    let id = fed.submit("dp-no-rows.toml", &text);
    let st = fed.wait_done(&id, 60);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let log = std::fs::read_to_string(fed.path("logs/hospital-a.log")).unwrap_or_default();
    assert!(log.contains("dropped=50"), "hospital-a's log:\n{log}");
    assert_eq!(
        ledger(&fed, "hospital-a")["datasets"]["data"]["jobs"][&id]["epsilon"].as_f64(),
        Some(record_cost(&text))
    );
    // A data set that cannot be read: its file is gone (a watched directory
    // with no batch would be no rows, as above).
    std::fs::remove_file(&a).expect("remove");
    let id = fed.submit("dp-unreadable.toml", &text);
    let st = fed.wait_done(&id, 60);
    assert_ne!(st["state"], "succeeded", "{st:#}");
    let detail = st["parties"]["hospital-a"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("could not set up the job on its data set"), "{st:#}");
    assert!(!detail.contains("batches") && !detail.contains(".csv"), "the reason left the party: {detail}");
    let log = std::fs::read_to_string(fed.path("logs/hospital-a.log")).unwrap_or_default();
    assert!(log.contains("No such file"), "hospital-a's log:\n{log}");
    let l = ledger(&fed, "hospital-a");
    assert_eq!(l["datasets"]["data"]["jobs"][&id]["epsilon"].as_f64(), Some(record_cost(&text)), "{l:#}");
}

/// A coordinator that asks, through `model.classes`, whether any of a
/// hospital's rows has a label at or above k learns nothing from whether
/// the party sets the job up: in a DP job the rows beyond the classes (and
/// any other row that fails its own checks: a malformed first row too) are
/// dropped, so data sets that differ by one such row all set up, on the
/// same other rows. Without `[dp]` the party still refuses such data,
/// naming the label. A declared width keeps even a well-formed row of
/// another width, placed first, from changing which rows are taken.
#[test]
fn whether_a_dp_job_sets_up_does_not_depend_on_one_row() {
    use confide_party::trainers::{BuiltinTrainers, TrainerFactory, rows_for_job};
    let dir = tempfile::tempdir().expect("dir");
    let rows: String = (0..40).map(|i| format!("{},{},{}\n", i as f32 * 0.1, (i % 5) as f32, i % 2)).collect();
    let factory = BuiltinTrainers::new(Default::default(), 1);
    let text = dp_spec("none", 1, 2, 1.0);
    let spec = JobSpec::parse(&text, "dp.toml", &Limits::default()).expect("spec");
    let mut plain = spec.clone();
    plain.dp = None;
    let cases = [
        ("plain.csv", rows.clone()),
        ("outlier.csv", format!("{rows}0.5,0.5,3\n")),
        ("bad-first-row.csv", format!("0.5,,1\n{rows}")),
        ("wide-first-row.csv", format!("1,2,3,1\n{rows}")),
    ];
    for (name, data) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, data).expect("write");
        let mut source = confide_algorithms::data::DatasetSource::csv(path);
        source.features = Some(2);
        let dp_source = rows_for_job(&spec, &source).expect("the DP reading");
        let (train, _, dropped) = dp_source.load_split_counted(0.0, 1).expect("rows");
        assert_eq!((train.len(), dropped), (40, usize::from(name != "plain.csv")), "{name}: the same 40 rows");
        assert!(factory.build(&spec, &dp_source, "hospital-a").is_ok(), "{name}: a DP job sets up");
        let refused = factory.build(&plain, &source, "hospital-a").err();
        match name {
            "plain.csv" => assert_eq!(refused, None),
            "outlier.csv" => assert!(refused.as_deref().is_some_and(|w| w.contains("label 3")), "{refused:?}"),
            _ => assert!(refused.is_some(), "{name}: refused without [dp]"),
        }
    }
    // The spec's ranges and the data set's declared width must agree.
    let ranged = JobSpec::parse(
        &text
            .replace("standardize = false", "standardize = true")
            .replace("[dp]\n", "[dp]\nfeature_ranges = [[0, 1]]\n"),
        "dp.toml",
        &Limits::default(),
    )
    .expect("spec");
    let mut source = confide_algorithms::data::DatasetSource::csv(dir.path().join("plain.csv"));
    source.features = Some(2);
    let why = rows_for_job(&ranged, &source).expect_err("disagree");
    assert!(why.contains("has 1 ranges") && why.contains("declares 2 features"), "{why}");
    // Without a width declared anywhere, a DP job does not read the rows.
    source.features = None;
    let why = rows_for_job(&spec, &source).expect_err("no width");
    assert!(why.contains("features = N"), "{why}");
    // One valid row or none: the job sets up either way, for every
    // built-in model (DP-SGD then sends noise alone).
    for model in ["logistic_regression\nclasses = 2", "mlp\nclasses = 2\nhidden = [4]"] {
        let spec =
            JobSpec::parse(&text.replace("logistic_regression\nclasses = 2", model), "dp.toml", &Limits::default())
                .expect("spec");
        for (name, data, valid) in
            [("one.csv", "1,2,3,1\n0.5,,1\n0.5,0.5,1\n", 1), ("none.csv", "1,2,3,1\n0.5,,1\n", 0)]
        {
            let path = dir.path().join(name);
            std::fs::write(&path, data).expect("write");
            let mut source = confide_algorithms::data::DatasetSource::csv(path);
            source.features = Some(2);
            let dp_source = rows_for_job(&spec, &source).expect("the DP reading");
            assert_eq!(dp_source.load_split_counted(0.0, 1).expect("rows").0.len(), valid);
            let mut trainer = factory.build(&spec, &dp_source, "hospital-a").expect("a DP job sets up");
            let plan = spec.dp.as_ref().expect("dp").plan(&spec.training, spec.rounds).expect("plan");
            let config = confide_algorithms::FitConfig { round: 1, train: spec.training.clone() };
            trainer.fit_private(&config, &plan).expect("DP-SGD over one row or none");
            assert!(trainer.parameters().expect("parameters").num_values() > 0);
        }
    }
}

/// Which rows a party holds out is a function of each row alone, so
/// whether any row is held out depends on the rows. An evaluation over no
/// held-out rows is over none, not (the trainers' fallback) over every
/// training row: otherwise a coordinator that picks a seed and a tiny
/// `validation_fraction` putting one known row alone on the held-out side
/// would see a DP evaluation count about one row if the row is there and
/// every row if it is not, far beyond the counts' sensitivity.
#[test]
fn an_evaluation_over_no_held_out_rows_is_over_none_not_every_row() {
    use confide_party::trainers::{BuiltinTrainers, TrainerFactory, rows_for_job};
    let dir = tempfile::tempdir().expect("dir");
    let rows: String = (0..200).map(|i| format!("{},{},{}\n", i as f32 * 0.1, (i % 5) as f32, i % 2)).collect();
    let target = "7.25,1.5,1\n";
    let (without, with) = (dir.path().join("without.csv"), dir.path().join("with.csv"));
    std::fs::write(&without, &rows).expect("write");
    std::fs::write(&with, format!("{rows}{target}")).expect("write");
    // The attacker's search: a seed that holds out the target row and no other.
    let all = confide_algorithms::data::DatasetSource::csv(with.clone()).load().expect("rows");
    let fraction = 0.002;
    let seed = (0..1_000_000u64)
        .find(|&seed| {
            let (_, held) = all.split(fraction, seed);
            held.len() == 1 && held.labels == [1] && held.features == [7.25, 1.5]
        })
        .expect("a seed");
    let spec = |dp: &str| {
        let text = format!(
            "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"p0\"]\nmin = 1\n\
             dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n\
             [training]\nvalidation_fraction = {fraction}\nseed = {seed}\n{dp}"
        );
        JobSpec::parse(&text, "e.toml", &Limits::default()).expect("spec")
    };
    let factory = BuiltinTrainers::new(Default::default(), 1);
    for spec in [spec("[dp]\nnoise_multiplier = 2.0\n"), spec("")] {
        let evaluated = |path: &std::path::Path| {
            let mut source = confide_algorithms::data::DatasetSource::csv(path.to_owned());
            source.features = Some(2);
            let source = rows_for_job(&spec, &source).expect("rows");
            let mut trainer = factory.build(&spec, &source, "hospital-a").expect("trainer");
            let outcome = trainer.evaluate().expect("evaluate");
            (outcome.num_examples, outcome.metrics.contains_key("accuracy"))
        };
        assert_eq!(evaluated(&with), (1, true), "the target row alone");
        assert_eq!(evaluated(&without), (0, true), "no row, and the same metrics");
    }
}

/// The coordinator's accountant is saved with each checkpoint: after a
/// SIGKILL and restart, the job reports the same ε for the same rounds,
/// and at the end exactly the ε of its rounds, as `confide job validate`
/// computes it from the spec.
#[test]
fn epsilon_is_unchanged_across_a_coordinator_restart() {
    epsilon_survives_a_restart(&dp_spec("secagg", 3, 12, 1.5), 12);
}

/// The same with the PLD accountant, whose checkpointed state is the
/// rounds it composed.
#[test]
fn pld_epsilon_is_unchanged_across_a_coordinator_restart() {
    let text = dp_spec("secagg", 3, 12, 1.5).replace("delta = 1e-5\n", "delta = 1e-5\naccountant = \"pld\"\n");
    let spec = JobSpec::parse(&text, "dp.toml", &Limits::default()).expect("spec");
    assert_eq!(spec.dp.as_ref().expect("dp").accountant, confide_proto::dpspec::AccountantKind::Pld);
    epsilon_survives_a_restart(&text, 12);
}

/// The PLD accountant charged its lattice slack for `dp.max_model_values`
/// values per release: a party refuses to train a larger global model (a
/// coordinator that sends one is named), so the job fails rather than
/// spending more than it stated.
#[test]
fn a_model_larger_than_the_pld_accounted_for_is_refused() {
    let fed = federation("[policy]\naggregation = [\"secagg\"]\n");
    // The logistic regression on 30 features has 62 values.
    let text = dp_spec("secagg", 3, 2, 1.5)
        .replace("delta = 1e-5\n", "delta = 1e-5\naccountant = \"pld\"\nmax_model_values = 10\n");
    let spec = JobSpec::parse(&text, "dp.toml", &Limits::default()).expect("spec");
    assert_eq!(spec.dp.as_ref().expect("dp").model_values_bound(), 10);
    let id = fed.submit("pld.toml", &text);
    let st = fed.wait_done(&id, 60);
    assert_eq!(st["state"], "failed", "{st:#}");
    let text = format!("{st}{}", fed.logs());
    assert!(text.contains("dp.max_model_values"), "{st:#}");
}

/// The job's status once its parties are stopped and no answer sent before
/// the stop can close another round.
fn settled_status(fed: &Federation, id: &str) -> Value {
    let mut before = fed.status(id);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(700));
        let now = fed.status(id);
        if now["rounds_completed"] == before["rounds_completed"] {
            return now;
        }
        before = now;
    }
}

fn epsilon_survives_a_restart(text: &str, rounds: u32) {
    let mut fed = federation("[policy]\naggregation = [\"secagg\"]\n");
    let text = text.to_owned();
    let id = fed.submit("dp.toml", &text);
    fed.wait_for(&id, 60, "two rounds", |s| s["rounds_completed"].as_u64() >= Some(2));
    fed.signal_parties("STOP");
    let before = settled_status(&fed, &id);
    assert_eq!(before["state"], "running", "{before:#}");
    let spent = before["privacy"]["epsilon"].as_f64().expect("epsilon");
    let spec = JobSpec::parse(&text, "dp.toml", &Limits::default()).expect("spec");
    let dp = spec.dp.as_ref().expect("dp");
    let done = before["rounds_completed"].as_u64().expect("rounds") as u32;
    assert!((spent - dp.epsilon(&spec.training, done)).abs() < 1e-9, "{spent} after {done} rounds");
    fed.kill_coordinator();
    fed.start_coordinator();
    let after = fed.status(&id);
    assert_eq!(after["rounds_completed"], before["rounds_completed"]);
    assert_eq!(after["privacy"]["epsilon"].as_f64(), Some(spent), "ε changed across the restart");
    fed.signal_parties("CONT");
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["privacy"]["accountant"], dp.accountant.as_str(), "{st:#}");
    let total = dp.epsilon(&spec.training, rounds);
    assert!((st["privacy"]["epsilon"].as_f64().expect("epsilon") - total).abs() < 1e-9, "{st:#}");
    // Under DP-SGD a record's ε is the job's.
    assert_eq!(st["privacy"]["record_epsilon"], st["privacy"]["epsilon"], "{st:#}");
    // Each round's record carries the ε spent up to it, restart or not.
    let history = st["history"].as_array().expect("history");
    assert_eq!(history.len(), rounds as usize, "{st:#}");
    for (i, r) in history.iter().enumerate() {
        let round = r["round"].as_u64().expect("round") as u32;
        let e = r["metrics"]["epsilon"].as_f64().unwrap_or_else(|| panic!("round {round} has no ε: {r:#}"));
        assert!((e - dp.epsilon(&spec.training, round)).abs() < 1e-9, "record {i}, round {round}: ε {e}");
    }
    // Each hospital's ledger holds at least what the job reports.
    for p in three() {
        let l = ledger(&fed, p);
        assert!(l["datasets"]["data"]["epsilon"].as_f64() >= Some(total), "{p}: {l:#}");
    }
}

/// Central party-level DP (DP-FedAvg) under `protocol = "none"`: parties
/// that opt in clip their updates, the coordinator adds the noise, the job
/// reports the party-level ε its spec costs, and each ledger charges the
/// per-record ε.
#[test]
fn a_central_party_level_dp_job_runs_for_parties_that_accept_it() {
    let fed = federation("[policy]\naggregation = [\"none\"]\naccept_central_dp = true\nmax_epsilon = 50.0\n");
    let text = dp_spec("none", 3, 4, 1.5).replace(
        "[dp]\nnoise_multiplier = 1.5\nsampling_rate = 0.05\n",
        "[dp]\nlevel = \"party\"\nnoise_multiplier = 1.5\nupdate_clip = 0.5\nadaptive_clip_quantile = 0.5\n",
    );
    assert!(text.contains("level = \"party\""), "{text}");
    let id = fed.submit("central.toml", &text);
    let st = fed.wait_done(&id, 90);
    assert_party_level_costs(&fed, &id, &text, &st);
    // No party sent a metric of its own.
    assert!(st["history"][0]["metrics"].get("train_loss").is_none(), "{st:#}");
    // With a fixed clip a record costs more than the party-level ε, and
    // the status says how much.
    let fixed = text.replace("adaptive_clip_quantile = 0.5\n", "");
    let id = fed.submit("central-fixed.toml", &fixed);
    let st = fed.wait_done(&id, 90);
    assert_party_level_costs(&fed, &id, &fixed, &st);
    assert!(st["privacy"]["record_epsilon"].as_f64() > st["privacy"]["epsilon"].as_f64().map(|e| 1.5 * e), "{st:#}");
}

/// Central adaptive clipping's clip is checkpointed with the accountant: a
/// restarted coordinator goes on from the saved clip, not the spec's first
/// one (each round's clip is in its metrics, `dp_clip`). The first clip is
/// far above the updates' norms and the rate high, so the clip falls fast;
/// every round's clip must be one step of the update rule from the one
/// before, which a clip lost in the restart (back to 100) is not. The
/// count's noise is set low (σ_b = 0.8, just above z/2; the default is z,
/// a standard deviation of half the fraction of three parties), so that
/// the first two rounds' noisy counts do not move the clip up by chance.
/// The party-level ε the status reports, and each round's, is the same
/// across the restart.
#[test]
fn central_adaptive_clip_survives_a_coordinator_restart() {
    let mut fed = federation("[policy]\naggregation = [\"none\"]\naccept_central_dp = true\nmax_epsilon = 500.0\n");
    let (first, rate, quantile): (f64, f64, f64) = (100.0, 2.0, 0.05);
    let text = dp_spec("none", 3, 6, 1.5).replace(
        "[dp]\nnoise_multiplier = 1.5\nsampling_rate = 0.05\n",
        &format!(
            "[dp]\nlevel = \"party\"\nnoise_multiplier = 1.5\nupdate_clip = {first:.1}\nadaptive_clip_quantile = \
             {quantile}\nadaptive_clip_rate = {rate:.1}\nclip_count_stddev = 0.8\n"
        ),
    );
    let id = fed.submit("central.toml", &text);
    fed.wait_for(&id, 60, "two rounds", |s| s["rounds_completed"].as_u64() >= Some(2));
    fed.signal_parties("STOP");
    let before = settled_status(&fed, &id);
    let done = before["rounds_completed"].as_u64().expect("rounds") as usize;
    let clips = |st: &Value| -> Vec<f64> {
        st["history"].as_array().expect("history").iter().filter_map(|r| r["metrics"]["dp_clip"].as_f64()).collect()
    };
    let saved = clips(&before);
    assert_eq!(saved.len(), done, "{before:#}");
    // Party-level ε too: the accountant's state survives the restart.
    let spec = JobSpec::parse(&text, "central.toml", &Limits::default()).expect("spec");
    let dp = spec.dp.as_ref().expect("dp");
    let spent = before["privacy"]["epsilon"].as_f64().expect("epsilon");
    assert!((spent - dp.epsilon(&spec.training, done as u32)).abs() < 1e-9, "{spent} after {done} rounds");
    fed.kill_coordinator();
    fed.start_coordinator();
    let after = fed.status(&id);
    assert_eq!(after["rounds_completed"], before["rounds_completed"]);
    assert_eq!(after["privacy"]["epsilon"].as_f64(), Some(spent), "ε changed across the restart");
    fed.signal_parties("CONT");
    let st = fed.wait_done(&id, 120);
    assert_party_level_costs_with(&fed, &id, &text, &st, true);
    for r in st["history"].as_array().expect("history") {
        let round = r["round"].as_u64().expect("round") as u32;
        let e = r["metrics"]["epsilon"].as_f64().unwrap_or_else(|| panic!("round {round} has no ε: {r:#}"));
        assert!((e - dp.epsilon(&spec.training, round)).abs() < 1e-9, "round {round}: ε {e}");
    }
    let all = clips(&st);
    assert_eq!(all.len(), 6, "{st:#}");
    assert_eq!(&all[..done], saved.as_slice());
    assert_eq!(all[0], first, "the first round clips at update_clip");
    // One step moves the clip by a factor in [e^{−η(1−γ)}, e^{ηγ}].
    let (down, up) = ((-rate * (1.0 - quantile)).exp(), (rate * quantile).exp());
    assert!(saved[done - 1] * up < first, "the clip did not fall before the restart: {all:?}");
    for w in all.windows(2) {
        assert!(w[1] <= w[0] * up * (1.0 + 1e-9) && w[1] >= w[0] * down * (1.0 - 1e-9), "{all:?}");
    }
}

/// Distributed party-level DP under `secagg`: each party adds its share of
/// the discrete Gaussian before masking, so no party needs to trust the
/// coordinator with the noise (`accept_central_dp` is not set). The job
/// reports the distributed mechanism's own ε; each ledger charges the
/// per-record ε.
/// The clip adapts (the count of unclipped updates rides in the same sum).
#[test]
fn a_distributed_party_level_dp_job_runs_under_secure_aggregation() {
    let fed = federation("[policy]\naggregation = [\"secagg\"]\nmax_epsilon = 50.0\n");
    let text = dp_spec("secagg", 3, 4, 1.5)
        .replace(
            "[dp]\nnoise_multiplier = 1.5\nsampling_rate = 0.05\n",
            "[dp]\nlevel = \"party\"\nnoise_multiplier = 1.5\nupdate_clip = 0.5\nadaptive_clip_quantile = 0.5\n\
             answer_fit_after_secs = 0.3\n",
        )
        .replace("learning_rate = 0.01", "learning_rate = 0.1");
    assert!(text.contains("level = \"party\""), "{text}");
    let spec = JobSpec::parse(&text, "d.toml", &Limits::default()).expect("spec");
    assert!(spec.dp.as_ref().is_some_and(|d| d.distributed.is_some()), "{text}");
    let id = fed.submit("distributed.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_party_level_costs(&fed, &id, &text, &st);
}

/// An evaluate job with `[dp]`: hospitals whose policy sets `max_epsilon`
/// accept it, and each ledger is charged exactly its ε, for one release.
/// Under secure aggregation the coordinator learns only the sums of the
/// parties' noisy counts: the status shows the accuracy and ε, no loss (a
/// row's loss is unbounded, so it is not released).
#[test]
fn a_dp_evaluation_releases_only_noisy_counts_and_is_charged_to_each_ledger() {
    let fed = federation(&policy(20.0));
    let train = dp_spec("secagg", 3, 2, 2.0);
    let id = fed.submit("dp.toml", &train);
    assert_eq!(fed.wait_done(&id, 90)["state"], "succeeded", "{}", fed.logs());
    let eval = format!(
        "name = \"dp-eval\"\nkind = \"evaluate\"\nfrom_job = \"{id}\"\n[parties]\nnames = [\"hospital-a\", \
         \"hospital-b\", \"hospital-c\"]\nmin = 3\ndataset = \"data\"\n[model]\nkind = \"logistic_regression\"\n\
         classes = 2\nstandardize = false\n[dp]\ntarget_epsilon = 1.0\n[aggregation]\nprotocol = \"secagg\"\n\
         [timeouts]\nrecruit_secs = 30\nround_secs = 30\n"
    );
    let eps = cost(&eval);
    assert!(eps <= 1.0 && eps > 0.99, "{eps}");
    assert_eq!(record_cost(&eval), eps, "example level: the ledger charges what the job states");
    let ev = fed.submit("dp-eval.toml", &eval);
    let st = fed.wait_done(&ev, 60);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    // What is released is two noisy integer counts summed over the parties
    // (rows n and correct c, each with discrete Gaussian noise of σ = z·√2
    // per party): the accuracy (clamped to [0, 1]) is c/n, so accuracy × n
    // is an integer. The noisy n is within 10 standard deviations of the
    // parties' true held-out rows (the split each party makes, recomputed
    // here), which a correct release misses with probability below 10^-20.
    // With ~114 rows at ε = 1 the noise is too large to pin the accuracy
    // near the model's: an assertion of at least 0.5 once failed at 0.41
    // for this near-chance model.
    let accuracy = st["metrics"]["accuracy"].as_f64().expect("accuracy");
    let examples = st["metrics"]["num_examples"].as_f64().expect("num_examples");
    let correct = accuracy * examples;
    assert!((correct - correct.round()).abs() < 1e-6, "a ratio of two counts: {st:#}");
    let spec = JobSpec::parse(&eval, "dp-eval.toml", &Limits::default()).expect("spec");
    let held_out: usize = three()
        .iter()
        .map(|p| {
            let split = fed.party_data(p).load_split(spec.training.validation_fraction, spec.training.seed);
            split.expect("the party's rows").1.len()
        })
        .sum();
    let sigma = spec.dp.expect("dp").noise_multiplier * 2f64.sqrt() * 3f64.sqrt();
    assert!(held_out > 50, "{held_out} held-out rows");
    assert!((examples - held_out as f64).abs() <= 10.0 * sigma, "{examples} noisy rows for {held_out}: {st:#}");
    assert!(st["metrics"].get("loss").is_none(), "no loss is released: {st:#}");
    assert!((st["privacy"]["epsilon"].as_f64().unwrap_or_default() - eps).abs() < 1e-9, "{st:#}");
    assert_eq!(st["history"][0]["participants"].as_array().map(Vec::len), Some(3), "{st:#}");
    for p in three() {
        let l = ledger(&fed, p);
        let job = &l["datasets"]["data"]["jobs"][&ev];
        assert_eq!(job["epsilon"].as_f64(), Some(eps), "{p}: {l:#}");
        assert_eq!(job["rounds_started"].as_u64(), Some(1), "{p}: one release: {l:#}");
    }
}

/// The round benchmark's every privacy mode runs end to end (three
/// parties, a thousand values, one round): a change that made the
/// benchmark's own job fail (its synthetic parties refusing a DP job, say)
/// shows here, not first in `make bench`. No figure is checked.
#[test]
fn the_round_benchmark_runs_each_privacy_mode() {
    let out = std::process::Command::new(confide_tests::bin_dir().join("confide-bench"))
        .args(["round", "--parties", "3", "--params", "1000", "--privacy", "none,secagg,secagg-dp,he"])
        .args(["--repeat", "1", "--rounds", "1"])
        .output()
        .expect("confide-bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut stream = serde_json::Deserializer::from_str(&text).into_iter::<Value>();
    let modes: Vec<String> = std::iter::from_fn(|| stream.next())
        .map(|v| v.expect("JSON")["privacy"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(modes, ["none", "secagg", "secagg-dp", "he"], "{text}");
}

/// A pipeline's training job that selected no batch (see
/// `confide_party::watch::no_rows`): without DP the party refuses it,
/// saying so; under DP it sets up on no rows (DP-SGD sends noise alone),
/// since whether it does must not depend on whether one row arrived. An
/// evaluation's spec cannot give feature ranges, so a DP evaluate job on a
/// data set without a declared width is told to declare `features` alone.
#[test]
fn a_dp_pipeline_job_with_no_batch_sets_up_on_no_rows() {
    use confide_party::plugins::{JobContext, PartyJobKind};
    use confide_party::training::TrainingKind;
    let dir = tempfile::tempdir().expect("dir");
    let mut source = confide_algorithms::data::DatasetSource::csv(dir.path().to_owned());
    source.features = Some(2);
    source.only = Some(Vec::new());
    assert!(confide_party::watch::no_rows(&source));
    let ledger = confide_party::ledger::Ledger::open(&dir.path().join("ledger.json")).expect("ledger");
    let reserved = std::cell::Cell::new(true);
    let handler = |text: &str| {
        let spec = std::sync::Arc::new(JobSpec::parse(text, "dp.toml", &Limits::default()).expect("spec"));
        // A DP job sets up only on a reservation, as a node makes one.
        let budget =
            (spec.dp.is_some() && reserved.get()).then(|| ledger.reserve("j", &spec, "d", None).expect("reserved"));
        let cx = JobContext {
            job_id: "j",
            spec: &spec,
            party: "hospital-a",
            dataset: &source,
            trainers: &confide_party::trainers::BuiltinTrainers::default(),
            protocols: confide_crypto::aggregation::Protocols::builtin(),
            identity: confide_crypto::secagg::testing::identity("hospital-a"),
            limits: &Limits::default(),
            min_parties: 1,
            budget,
            noise_rounds_ahead: 1,
            answers_held: false,
        };
        TrainingKind::TRAIN.handler(cx).map(|_| ())
    };
    let dp = dp_spec("none", 1, 2, 1.0);
    assert_eq!(handler(&dp), Ok(()));
    // Without its ledger reservation, a DP job does not set up at all.
    reserved.set(false);
    assert!(handler(&dp).expect_err("no reservation").contains("privacy ledger reservation"));
    reserved.set(true);
    let plain = dp.replace("[dp]\nnoise_multiplier = 1\nsampling_rate = 0.05\ndelta = 1e-5\n", "");
    assert!(!plain.contains("[dp]"), "{plain}");
    let e = handler(&plain).expect_err("refused without DP");
    assert!(e.contains("found no batch"), "{e}");
    // The width message for an evaluation names `features` only.
    let evaluate = "name = \"e\"\nkind = \"evaluate\"\nfrom_job = \"j0\"\n[parties]\nnames = [\"p0\"]\nmin = 1\n\
                    dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n[dp]\nnoise_multiplier = 2.0\n";
    let spec = JobSpec::parse(evaluate, "e.toml", &Limits::default()).expect("spec");
    let why = confide_party::trainers::width_undeclared(&spec);
    assert!(why.contains("features = N") && !why.contains("feature_ranges"), "{why}");
    let train = JobSpec::parse(&dp, "dp.toml", &Limits::default()).expect("spec");
    assert!(confide_party::trainers::width_undeclared(&train).contains("feature_ranges"));
}

/// The number after `prefix` at the start of a (trimmed) line of `text`.
fn number_after(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{text}"))
}

/// `confide job validate` (the binary) prints the ε the demo's spec costs,
/// as the spec's own accountant computes it, and `--target-epsilon`
/// prints a noise multiplier that, put in the spec, costs at most the
/// target; a target out of range is refused naming the flag.
#[test]
fn job_validate_prints_the_epsilon_a_spec_costs_and_the_noise_for_a_target() {
    let confide = confide_tests::bin_dir().join("confide");
    let path = repo_root().join("examples/jobs/breast-cancer-dp.toml");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(&confide)
            .args(["job", "validate", path.to_str().expect("path")])
            .args(extra)
            .env("CONFIDE_LOG", "warn")
            .output()
            .expect("run confide");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = run(&[]);
    assert!(ok, "{stdout}{stderr}");
    let text = std::fs::read_to_string(&path).expect("spec");
    let expected = cost(&text);
    let printed = number_after(&stdout, "dp: ε = ");
    assert!((printed - expected).abs() < 5e-5, "printed ε {printed}, the spec's accountant {expected}:\n{stdout}");
    assert!(expected <= 4.0 + 1e-9, "the demo's spec costs ε = {expected}");

    let (ok, stdout, stderr) = run(&["--target-epsilon", "2"]);
    assert!(ok, "{stdout}{stderr}");
    let z = number_after(&stdout, "noise_multiplier = ");
    // The printed multiplier, put in the spec instead of the target, costs at most ε = 2 (and not far below).
    let mut raw: toml::Table = toml::from_str(&text).expect("toml");
    let dp = raw.get_mut("dp").and_then(|d| d.as_table_mut()).expect("[dp]");
    dp.remove("target_epsilon");
    dp.insert("noise_multiplier".into(), toml::Value::Float(z));
    let with_z = cost(&toml::to_string(&raw).expect("toml"));
    assert!(with_z <= 2.0 && with_z > 1.99, "noise_multiplier = {z} costs ε = {with_z}");

    let (ok, _, stderr) = run(&["--target-epsilon", "0"]);
    assert!(!ok && stderr.contains("--target-epsilon: must be in (0,"), "{stderr}");
}
