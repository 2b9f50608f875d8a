//! The documented extension examples (`examples/custom_strategy.rs`,
//! `examples/custom_trainer.rs`) run as real coordinator and party programs
//! in a federation.

use std::path::PathBuf;

use confide_algorithms::{Parameters, TrainConfig};
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_tests::{
    Federation, bin_dir, independent_fedavg_with, job_spec, max_abs_diff, repo_root, standardised_start,
};

fn example(name: &str) -> PathBuf {
    let path = bin_dir().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` first (make test does)",
        path.display()
    );
    path
}

fn federation() -> Federation {
    let names = ["hospital-a", "hospital-b", "hospital-c"];
    Federation::new(&names, &repo_root().join("examples/data/breast_cancer.csv"), true, "5,3,2")
}

#[test]
fn the_custom_strategy_decays_the_learning_rate_as_documented() {
    let mut fed = federation();
    fed.coordinator_bin = example("custom_strategy");
    fed.start_coordinator();
    fed.start_parties();
    let base =
        job_spec(&fed.names, 3, 3, "kind = \"logistic_regression\"\nclasses = 2", "learning_rate = 0.2\nseed = 4");
    let text = format!("{base}[strategy]\nname = \"custom\"\ncustom = \"lr-decay\"\noptions = {{ gamma = 0.5 }}\n");
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let model = Parameters::from_safetensors(&fed.model(&id)).expect("model");

    // The same federation by hand, with η_t = 0.2 · 0.5^(t−1).
    let spec = JobSpec::parse(&text, "job.toml", &Limits::default()).expect("spec");
    let mut trainers = fed.trainers(|data, n| BuiltinTrainers::default().build(&spec, data, n).expect("trainer"));
    let global = standardised_start(&trainers);
    let decayed = |t: u32| TrainConfig { learning_rate: 0.2 * 0.5f64.powi(t as i32 - 1), ..spec.training.clone() };
    let expected = independent_fedavg_with(&mut trainers, global.clone(), decayed, 3);
    assert!(max_abs_diff(&model, &expected) <= 1e-5, "the model is not FedAvg with the decayed learning rate");
    let undecayed = independent_fedavg_with(&mut trainers, global, |_| spec.training.clone(), 3);
    assert!(max_abs_diff(&model, &undecayed) > 1e-4, "the learning rate did not decay");

    // Bad options and unknown strategies are refused at submission, by field.
    let bad = text.replace("gamma = 0.5", "gamma = 2.0");
    let out = fed.cli(&["job", "submit", &write(&fed, "bad.toml", &bad)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("strategy.options: lr-decay: gamma must be in (0, 1]"), "{err}");
    let unknown = text.replace("\"lr-decay\"", "\"nope\"");
    let out = fed.cli(&["job", "submit", &write(&fed, "unknown.toml", &unknown)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("strategy.custom: no strategy named \"nope\" is registered") && err.contains("lr-decay"),
        "{err}"
    );
}

#[test]
fn the_custom_trainer_trains_a_linear_svm_and_plain_parties_refuse_it() {
    let mut fed = federation();
    fed.party_bin = example("custom_trainer");
    fed.start_coordinator();
    fed.start_party("hospital-a", "");
    fed.start_party("hospital-b", "");
    fed.party_bin = bin_dir().join("confide-party");
    fed.start_party("hospital-c", "");
    let model = "kind = \"custom\"\ncustom = \"linear-svm\"\nclasses = 2";
    let text = job_spec(&fed.names, 2, 5, model, "learning_rate = 0.05\nl2 = 0.001\nseed = 9");
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert!(st["parties"]["hospital-c"].to_string().contains("no trainer named"), "{st:#}");
    assert!(st["metrics"]["accuracy"].as_f64().is_some_and(|a| a > 0.93), "{st:#}");
    let params = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    let names: Vec<String> = params.spec().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["input.mean", "input.std", "svm.weight", "svm.bias"]);

    // The build's local commands train with its own trainer too (they ran
    // the built-in ones only: found by review); the stock party cannot.
    let spec = write(&fed, "svm.toml", &text);
    let model = fed.path("svm-local.safetensors");
    let local = |bin: PathBuf| {
        std::process::Command::new(bin)
            .args(["train-local", "--spec", &spec, "--data", &fed.s("data/hospital-a.csv")])
            .args(["--test", &fed.s("data/test.csv"), "--out", model.to_str().expect("utf-8"), "--json"])
            .env("CONFIDE_LOG", "warn")
            .output()
            .expect("train-local")
    };
    let out = local(example("custom_trainer"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["test"]["metrics"]["accuracy"].as_f64().is_some_and(|a| a > 0.85), "{v}");
    let params = Parameters::from_safetensors(&std::fs::read(&model).expect("model")).expect("model");
    assert!(params.get("svm.weight").is_some());
    let out = local(bin_dir().join("confide-party"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("linear-svm"), "{}", String::from_utf8_lossy(&out.stderr));
}

fn write(fed: &Federation, name: &str, text: &str) -> String {
    let path = fed.path(name);
    std::fs::write(&path, text).expect("write spec");
    path.to_string_lossy().into_owned()
}
