//! End-to-end jobs with libtorch trainers: real `confide` and `confide-party`
//! processes on loopback over mutual TLS.

use std::path::PathBuf;

use confide_algorithms::Parameters;
use confide_algorithms::data::DatasetSource;
use confide_party::local;
use confide_party::trainers::{BuiltinTrainers, TrainerFactory};
use confide_proto::Limits;
use confide_proto::jobspec::JobSpec;
use confide_tests::{Federation, independent_fedavg, job_spec, max_abs_diff, repo_root, standardised_start};

const MLP: &str = "kind = \"mlp\"\nclasses = 2\nhidden = [32, 16]";
const SECAGG_POLICY: &str = "[policy]\naggregation = [\"none\", \"secagg\"]\n";

fn three() -> Vec<&'static str> {
    vec!["hospital-a", "hospital-b", "hospital-c"]
}

fn csv(path: PathBuf) -> DatasetSource {
    DatasetSource::csv(path)
}

/// The held-out test rows `confide data split` wrote, which no party trained on.
fn test_accuracy(fed: &Federation, spec: &JobSpec, model: &Parameters) -> f64 {
    let rows = local::load_rows(&[csv(fed.path("data/test.csv"))]).expect("test rows");
    let eval = local::evaluate(&BuiltinTrainers::new(Default::default(), 1), spec, model, rows).expect("evaluate");
    eval.metrics["accuracy"]
}

#[test]
fn mlp_job_under_secure_aggregation_reaches_95_percent_on_held_out_rows() {
    let mut fed = Federation::new(&three(), &repo_root().join("examples/data/breast_cancer.csv"), true, "5,3,2");
    fed.start_coordinator();
    for n in fed.names.clone() {
        fed.start_party(&n, SECAGG_POLICY);
    }
    let training = "batch_size = 16\nlearning_rate = 0.05\nmomentum = 0.9\nseed = 42";
    let text = format!(
        "{}[aggregation]\nprotocol = \"secagg\"\n[aggregation.secagg]\nmax_examples = 1000\n",
        job_spec(&fed.names, 3, 10, MLP, training)
    );
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 180);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["rounds_completed"], 10);
    let model = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    let names: Vec<String> = model.spec().into_iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        ["input.mean", "input.std", "fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight", "out.bias", "out.weight"]
    );
    let spec = JobSpec::parse(&text, "job.toml", &Limits::default()).expect("spec");
    let accuracy = test_accuracy(&fed, &spec, &model);
    assert!(accuracy >= 0.95, "held-out accuracy {accuracy}");
}

#[test]
fn plaintext_mlp_job_equals_the_independently_computed_weighted_mean() {
    let mut fed = Federation::new(&three(), &repo_root().join("examples/data/breast_cancer.csv"), true, "5,3,2");
    fed.start_coordinator();
    fed.start_parties();
    let training = "batch_size = 32\noptimizer = \"adam\"\nlearning_rate = 0.01\nweight_decay = 0.001\nseed = 3";
    let text = job_spec(&fed.names, 3, 3, MLP, training);
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let model = Parameters::from_safetensors(&fed.model(&id)).expect("model");

    // libtorch with one thread is deterministic: the same trainers in this
    // process, averaged by hand, give the same model.
    let spec = JobSpec::parse(&text, "job.toml", &Limits::default()).expect("spec");
    let factory = BuiltinTrainers::new(Default::default(), 1);
    let mut trainers = fed.trainers(|data, n| factory.build(&spec, data, n).expect("trainer"));
    let global = standardised_start(&trainers);
    let expected = independent_fedavg(&mut trainers, global, &spec.training, 3);
    let max_diff = max_abs_diff(&model, &expected);
    assert!(max_diff <= 1e-5, "federated MLP differs from the independent weighted mean by {max_diff}");
}

#[test]
fn cnn_job_with_fedprox_learns_the_digits() {
    let mut fed = Federation::new(&three(), &repo_root().join("examples/data/digits.csv.gz"), false, "1,1,1");
    fed.start_coordinator();
    fed.start_parties();
    let model = "kind = \"cnn\"\nclasses = 10\nchannels = [8, 16]\nimage = [1, 8, 8]";
    let training = "local_epochs = 2\nlearning_rate = 0.05\nmomentum = 0.9\nseed = 1";
    let text =
        format!("{}[strategy]\nname = \"fedprox\"\nproximal_mu = 0.01\n", job_spec(&fed.names, 3, 4, model, training));
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 180);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let spec = JobSpec::parse(&text, "job.toml", &Limits::default()).expect("spec");
    let accuracy = test_accuracy(&fed, &spec, &Parameters::from_safetensors(&fed.model(&id)).expect("model"));
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}");
}

#[test]
fn torchscript_job_trains_the_parties_own_module_and_a_party_without_it_refuses() {
    let mut fed = Federation::new(&three(), &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");
    fed.start_coordinator();
    let script = repo_root().join("examples/models/breast_cancer_mlp.pt");
    let models = format!("[models]\nbc-mlp = {:?}\n", script.to_string_lossy());
    fed.start_party("hospital-a", &models);
    fed.start_party("hospital-b", &models);
    fed.start_party("hospital-c", "");
    let model = "kind = \"torchscript\"\nclasses = 2\ntorchscript = \"bc-mlp\"";
    let text = job_spec(&fed.names, 2, 3, model, "learning_rate = 0.05\nseed = 2");
    let id = fed.submit("job.toml", &text);
    let st = fed.wait_done(&id, 120);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    let refusal = st["parties"]["hospital-c"].to_string();
    assert!(refusal.contains("no model named \\\"bc-mlp\\\""), "{st:#}");
    let spec = JobSpec::parse(&text, "job.toml", &Limits::default()).expect("spec");
    let params = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    assert!(params.get("hidden_weight").is_some());
    let rows = local::load_rows(&[csv(fed.path("data/test.csv"))]).expect("test rows");
    let factory = BuiltinTrainers::new([("bc-mlp".to_string(), script)].into(), 1);
    let accuracy = local::evaluate(&factory, &spec, &params, rows).expect("evaluate").metrics["accuracy"];
    assert!(accuracy >= 0.9, "held-out accuracy {accuracy}");
}

/// DP-SGD through a party's own TorchScript CNN (`digits_cnn.pt`, built
/// from the built-in CNN's blocks) under secure aggregation: each party
/// reconstructs the module's convolutions and linear layer, checked against
/// the module's forward, trains with DP-SGD, and the model is useful on
/// held-out rows.
#[test]
fn a_torchscript_cnn_trains_with_dp_sgd_under_secure_aggregation() {
    let mut fed = Federation::new(&three(), &repo_root().join("examples/data/digits.csv.gz"), false, "1,1,1");
    fed.start_coordinator();
    let script = repo_root().join("examples/models/digits_cnn.pt");
    let models = format!(
        "[models]\ndigits-cnn = {:?}\n[policy]\naggregation = [\"none\", \"secagg\"]\n",
        script.to_string_lossy()
    );
    for p in three() {
        fed.start_party(p, &models);
    }
    let model = "kind = \"torchscript\"\nclasses = 10\ntorchscript = \"digits-cnn\"\nstandardize = true";
    let training =
        "local_epochs = 2\nbatch_size = 32\nlearning_rate = 0.1\nmomentum = 0.9\nseed = 2\nvalidation_fraction = 0.0";
    // The pixels' public range (examples/data/digits.rst): 0 to 16.
    let ranges = vec!["[0, 16]"; 64].join(", ");
    let text = format!(
        "{}[dp]\nlevel = \"example\"\nnoise_multiplier = 1.0\ndelta = 1e-5\nsampling_rate = 0.1\n\
         max_grad_norm = 1.0\nfeature_ranges = [{ranges}]\n[aggregation]\nprotocol = \"secagg\"\n\
         [aggregation.secagg]\nmax_examples = 1\n",
        job_spec(&fed.names, 3, 8, model, training)
    );
    let id = fed.submit("dp-cnn.toml", &text);
    let st = fed.wait_done(&id, 180);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["privacy"]["dp"], "example", "{st:#}");
    let spec = JobSpec::parse(&text, "dp-cnn.toml", &Limits::default()).expect("spec");
    let params = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    assert!(params.get("conv1_weight").is_some());
    let rows = local::load_rows(&[csv(fed.path("data/test.csv"))]).expect("test rows");
    let factory = BuiltinTrainers::new([("digits-cnn".to_string(), script)].into(), 1);
    let accuracy = local::evaluate(&factory, &spec, &params, rows).expect("evaluate").metrics["accuracy"];
    // 0.88-0.92 in six runs (the noise is drawn afresh each run).
    assert!(accuracy >= 0.8, "held-out accuracy {accuracy}");
}

/// DP-SGD through a party's own TorchScript module: each party derives the
/// module's per-example gradients (its tanh MLP is a chain of linear
/// layers, checked against the module's forward), trains with DP-SGD under
/// secure aggregation, and the model is useful on held-out rows.
#[test]
fn a_torchscript_mlp_trains_with_dp_sgd_under_secure_aggregation() {
    let mut fed = Federation::new(&three(), &repo_root().join("examples/data/breast_cancer.csv"), true, "1,1,1");
    fed.start_coordinator();
    let script = repo_root().join("examples/models/breast_cancer_mlp.pt");
    let models =
        format!("[models]\nbc-mlp = {:?}\n[policy]\naggregation = [\"none\", \"secagg\"]\n", script.to_string_lossy());
    for p in three() {
        fed.start_party(p, &models);
    }
    let example = std::fs::read_to_string(repo_root().join("examples/jobs/breast-cancer-dp.toml")).expect("example");
    let text = example
        .replace("rounds = 20", "rounds = 8")
        .replace("dataset = \"breast-cancer\"", "dataset = \"data\"")
        .replace("kind = \"mlp\"", "kind = \"torchscript\"\ntorchscript = \"bc-mlp\"")
        .replace("hidden = [32, 16]\n", "")
        .replace("learning_rate = 0.03", "learning_rate = 0.1");
    let id = fed.submit("dp-script.toml", &text);
    let st = fed.wait_done(&id, 180);
    assert_eq!(st["state"], "succeeded", "{st:#}\n{}", fed.logs());
    assert_eq!(st["privacy"]["dp"], "example", "{st:#}");
    let spec = JobSpec::parse(&text, "dp-script.toml", &Limits::default()).expect("spec");
    let eps = spec.dp.as_ref().expect("dp").epsilon(&spec.training, spec.rounds);
    assert!((st["privacy"]["epsilon"].as_f64().unwrap_or_default() - eps).abs() < 1e-9, "{st:#}");
    let params = Parameters::from_safetensors(&fed.model(&id)).expect("model");
    let rows = local::load_rows(&[csv(fed.path("data/test.csv"))]).expect("test rows");
    let factory = BuiltinTrainers::new([("bc-mlp".to_string(), script)].into(), 1);
    let accuracy = local::evaluate(&factory, &spec, &params, rows).expect("evaluate").metrics["accuracy"];
    assert!(accuracy >= 0.85, "held-out accuracy {accuracy}");
}
