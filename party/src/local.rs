//! Party-side tools that need no coordinator: training the job's model on
//! local rows alone (a hospital's local-only baseline, or a central baseline
//! on pooled rows where that is allowed), and evaluating a federated model on
//! local rows that never took part in training.

use std::collections::BTreeMap;
use std::path::Path;

use confide_algorithms::data::{Dataset, DatasetSource};
use confide_algorithms::trainer::apply_feature_stats;
use confide_algorithms::{FitConfig, Metrics, Parameters, Trainer};
use confide_proto::jobspec::JobSpec;
use serde::Serialize;

use crate::trainers::{BuiltinTrainers, TrainerFactory};

/// The trainers a local command builds with: the built-in ones over rows
/// loaded here (several files concatenated), or a party build's own factory
/// (its [`crate::plugins::PartyPlugins::trainers`]) over one file, as its
/// `run` would.
#[derive(Clone)]
pub enum LocalTrainers {
    /// The built-in model kinds.
    Builtin(BuiltinTrainers),
    /// A build's own factory.
    Custom(std::sync::Arc<dyn TrainerFactory>),
}

impl LocalTrainers {
    /// A trainer for `spec` over every row of `sources` (none held out: a
    /// local command trains on, or scores, all the rows it is given).
    pub fn build(&self, spec: &JobSpec, sources: &[DatasetSource]) -> Result<Box<dyn Trainer>, String> {
        match self {
            LocalTrainers::Builtin(trainers) => {
                trainers.build_from(spec, load_rows(sources)?, Dataset::default(), "local")
            }
            LocalTrainers::Custom(factory) => {
                let [source] = sources else {
                    return Err(format!(
                        "--data: this party build's own trainers read one file ({} given)",
                        sources.len()
                    ));
                };
                let mut whole = spec.clone();
                whole.training.validation_fraction = 0.0;
                factory.build(&whole, source, "local")
            }
        }
    }
}

/// Loads and concatenates data sets with the same features; errors name the file.
pub fn load_rows(sources: &[DatasetSource]) -> Result<Dataset, String> {
    let mut all = Dataset::default();
    for src in sources {
        let ds = src.load().map_err(|e| e.to_string())?;
        if !all.is_empty() && ds.num_features != all.num_features {
            return Err(format!(
                "{}: {} features, but the files before it have {}",
                src.path.display(),
                ds.num_features,
                all.num_features
            ));
        }
        all.num_features = ds.num_features;
        all.features.extend_from_slice(&ds.features);
        all.labels.extend_from_slice(&ds.labels);
    }
    if all.is_empty() {
        return Err("no rows to use".into());
    }
    Ok(all)
}

/// What an evaluation found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Rows evaluated.
    pub examples: u64,
    /// Mean loss.
    pub loss: f64,
    /// Accuracy, and `auc` for binary tasks.
    pub metrics: Metrics,
}

/// Evaluates `params` (a model of `spec`) on `rows`.
pub fn evaluate(
    trainers: &BuiltinTrainers,
    spec: &JobSpec,
    params: &Parameters,
    rows: Dataset,
) -> Result<Evaluation, String> {
    evaluate_with(trainers.build_from(spec, rows, Dataset::default(), "local")?, params)
}

/// Evaluates `params` with a trainer already built over the rows to score.
pub fn evaluate_with(mut t: Box<dyn Trainer>, params: &Parameters) -> Result<Evaluation, String> {
    t.set_parameters(params).map_err(|e| format!("the model does not fit the job spec's model: {e}"))?;
    let out = t.evaluate().map_err(|e| e.to_string())?;
    Ok(Evaluation { examples: out.num_examples, loss: out.loss, metrics: out.metrics })
}

/// Trains `spec`'s model on `rows` alone, with the same schedule a federated
/// job runs (`rounds` × `local_epochs` epochs, same optimiser and seed, and
/// the same DP-SGD under `[dp]`), and standardisation from these rows'
/// statistics (or the spec's public ranges under `[dp]`). `on_round` sees each round's
/// training metrics.
pub fn train(
    trainers: &BuiltinTrainers,
    spec: &JobSpec,
    rows: Dataset,
    on_round: impl FnMut(u32, &Metrics),
) -> Result<Parameters, String> {
    train_with(trainers.build_from(spec, rows, Dataset::default(), "local")?, spec, on_round)
}

/// [`train`] with a trainer already built over the rows to train on.
pub fn train_with(
    mut t: Box<dyn Trainer>,
    spec: &JobSpec,
    mut on_round: impl FnMut(u32, &Metrics),
) -> Result<Parameters, String> {
    if spec.model.standardize {
        let mut p = t.parameters().map_err(|e| e.to_string())?;
        // Under [dp], the spec's public ranges, as in the federated job.
        let stats = match spec.dp.as_ref().and_then(|dp| dp.range_stats()) {
            Some(stats) => stats,
            None => t.feature_stats(),
        };
        apply_feature_stats(&mut p, &stats).map_err(|e| format!("dp.feature_ranges: {e}"))?;
        t.set_parameters(&p).map_err(|e| e.to_string())?;
    }
    let mut train = spec.training.clone();
    // Alone there is no global model to stay near.
    train.proximal_mu = 0.0;
    // Example-level DP trains with DP-SGD; a party-level job alone has no
    // aggregate to noise, and trains as usual.
    let plan = spec.dp.as_ref().and_then(|dp| dp.plan(&spec.training, spec.rounds));
    for round in 1..=spec.rounds {
        let config = FitConfig { round, train: train.clone() };
        let out = match &plan {
            // DP-SGD with the same plan, so the baseline costs the same ε.
            Some(plan) => t.fit_private(&config, plan),
            None => t.fit(&config),
        }
        .map_err(|e| format!("round {round}: {e}"))?;
        on_round(round, &out.metrics);
    }
    t.parameters().map_err(|e| e.to_string())
}

/// Reads a model file written by `confide job model` (safetensors).
pub fn read_model(path: &Path) -> Result<Parameters, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Parameters::from_safetensors(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes a model file that `confide-party evaluate` and `from_job`-style
/// tools read.
pub fn write_model(path: &Path, params: &Parameters, spec: &JobSpec) -> Result<(), String> {
    let meta = BTreeMap::from([("confide.job".to_string(), format!("local:{}", spec.name))]);
    let bytes = params.to_safetensors(&meta).map_err(|e| e.to_string())?;
    // A model of this party's rows alone: written whole and 0600.
    confide_proto::durable::write_file_mode(path, &bytes, 0o600)
}
