//! Secure aggregation end to end: ten real party processes, two of which
//! crash during the masked-input stage.

use confide_algorithms::data::DatasetSource;
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{FeatureStats, Parameters, Trainer};
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_tests::{Federation, independent_fedavg, job_spec, max_abs_diff, repo_root};

#[test]
fn secure_aggregation_recovers_the_survivors_sum_when_two_parties_crash_mid_stage() {
    let names: Vec<String> = (0..10).map(|i| format!("site-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let crashed = ["site-03", "site-07"];
    let mut fed =
        Federation::new(&refs, &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1,1,1,1,1,1,1,1");
    fed.start_coordinator();
    for n in &names {
        let mut extra = String::from("[policy]\naggregation = [\"secagg\"]\n");
        if crashed.contains(&n.as_str()) {
            extra.push_str("[fault]\nexit_on_stage = \"secagg-masked-input\"\nexit_on_round = 1\n");
        }
        fed.start_party(n, &extra);
    }
    let text = job_spec(&names, 6, 2, "kind = \"logistic_regression\"\nclasses = 2", "seed = 4\nlocal_epochs = 1")
        + "[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\nclip = 4.0\n";
    let id = fed.submit("secagg.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["privacy"]["aggregation"], "secagg");
    let survivors: Vec<String> = names.iter().filter(|n| !crashed.contains(&n.as_str())).cloned().collect();
    for round in 0..2 {
        assert_eq!(st["history"][round]["participants"], serde_json::json!(survivors), "{st:#}");
    }
    for c in crashed {
        let why = st["history"][0]["dropped"][c].as_str().unwrap_or_default();
        assert!(why.starts_with("secagg-masked-input"), "{c}: {why}\n{st:#}");
    }
    // The round's training loss is the secure example-weighted mean; no party's
    // own loss or training time reached the coordinator.
    let metrics = &st["history"][0]["metrics"];
    assert!(metrics["train_loss"].as_f64().is_some_and(|l| l > 0.0 && l < 10.0), "{metrics:#}");
    assert!(metrics.get("train_ms_max").is_none(), "{metrics:#}");

    // Independently: setup over all ten, then FedAvg over the eight survivors.
    let spec = JobSpec::parse(&text, "secagg.toml", &Limits::default()).expect("spec");
    let build = |n: &str| {
        let src = DatasetSource::csv(fed.path(&format!("data/{n}.csv")));
        BuiltinTrainers::default().build(&spec, &src, n).expect("trainer")
    };
    let mut stats = FeatureStats::default();
    for n in &names {
        stats.merge(&build(n).feature_stats()).expect("stats");
    }
    let mut global = build(&names[0]).parameters().expect("parameters");
    apply_feature_stats(&mut global, &stats).expect("apply");
    let mut trainers: Vec<Box<dyn Trainer>> = survivors.iter().map(|n| build(n)).collect();
    let global = independent_fedavg(&mut trainers, global, &spec.training, 2);
    let model = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    let max_diff = max_abs_diff(&model, &global);
    assert!(max_diff < 1e-4, "secure aggregate differs from the survivors' weighted mean by {max_diff}");
    assert!(fed.coordinator_log().contains("secagg"), "no secure aggregation in the coordinator log");
}
