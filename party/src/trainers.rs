//! Building a job's [`Trainer`] from its spec and the party's data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use confide_algorithms::data::{Dataset, DatasetSource, RowRules};
use confide_algorithms::{Architecture, Engine, LogisticRegression, Trainer};
use confide_proto::jobspec::JobSpec;

/// Makes the trainer for a job. The built-in factory covers the model kinds
/// of the job spec; a researcher can run a party with their own factory
/// (see `examples/custom_trainer.rs`).
pub trait TrainerFactory: Send + Sync {
    /// A trainer for `spec` over `data`, at party `party`.
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String>;
}

/// The model kinds built into Confide: the pure-Rust logistic regression
/// and, when built with the `torch` feature (the default), the libtorch
/// models.
#[derive(Debug, Default, Clone)]
pub struct BuiltinTrainers {
    /// TorchScript files by name (the party's `[models]` table).
    pub models: BTreeMap<String, PathBuf>,
}

/// A stable 64-bit value from the party name (FNV-1a), so each party shuffles
/// differently but reproducibly.
pub fn party_salt(party: &str) -> u64 {
    party.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Whether this build of the party can train libtorch models.
pub const HAS_TORCH: bool = cfg!(feature = "torch");

impl BuiltinTrainers {
    /// The factory for a party's config: its TorchScript files, and libtorch's
    /// thread count set once for the process.
    pub fn for_config(config: &crate::config::PartyConfig) -> Self {
        Self::new(config.models.clone(), config.training.threads)
    }

    /// The factory over these TorchScript files, with libtorch's thread count
    /// (set once per process; later values are ignored).
    pub fn new(models: BTreeMap<String, PathBuf>, threads: usize) -> Self {
        #[cfg(feature = "torch")]
        crate::torch::set_threads(threads);
        #[cfg(not(feature = "torch"))]
        let _ = threads;
        BuiltinTrainers { models }
    }

    /// A trainer for `spec` over rows already loaded and split. Errors name
    /// the field at fault.
    pub fn build_from(
        &self,
        spec: &JobSpec,
        train: Dataset,
        held_out: Dataset,
        party: &str,
    ) -> Result<Box<dyn Trainer>, String> {
        self.build_model(&spec.model, spec.training.seed, train, held_out, party)
    }

    /// A trainer for `model`, initialised from `seed`, over rows already
    /// loaded and split.
    pub fn build_model(
        &self,
        model: &confide_algorithms::ModelConfig,
        seed: u64,
        train: Dataset,
        held_out: Dataset,
        party: &str,
    ) -> Result<Box<dyn Trainer>, String> {
        match (model.engine(), &model.architecture) {
            (Engine::Rust, Architecture::LogisticRegression { .. }) => {
                let m = LogisticRegression::new(model.classes, train, held_out, seed, party_salt(party))
                    .map_err(|e| e.to_string())?;
                Ok(Box::new(m))
            }
            (_, Architecture::Custom { trainer }) => Err(format!(
                "model.custom: this party has no trainer named {trainer:?} (it runs the built-in trainers only)"
            )),
            #[cfg(feature = "torch")]
            (Engine::Torch, arch) => {
                let script = match arch {
                    Architecture::Torchscript { file } => Some(self.models.get(file).ok_or_else(|| {
                        format!("model.torchscript: no model named {file:?} in this party's [models] table")
                    })?),
                    _ => None,
                };
                let m = crate::torch::TorchTrainer::new(
                    model,
                    script.map(PathBuf::as_path),
                    train,
                    held_out,
                    seed,
                    party_salt(party),
                )
                .map_err(|e| e.to_string())?;
                Ok(Box::new(m))
            }
            (engine, _) => Err(format!(
                "model {} on engine {} is not available in this build of confide-party{}",
                model.kind().as_str(),
                engine.as_str(),
                if HAS_TORCH { "" } else { " (built without the `torch` feature)" }
            )),
        }
    }
}

impl BuiltinTrainers {
    /// A model for inference only: `model`'s architecture holding `params`.
    /// Loading the tensors checks their names and shapes against the
    /// architecture, so a model that is not what `model` describes is
    /// refused. The width comes from the input standardisation every
    /// built-in model carries; one zero row is the probe the trainers run
    /// to check that the network maps a row to `classes` logits.
    pub fn inference_model(
        &self,
        model: &confide_algorithms::ModelConfig,
        params: &confide_algorithms::Parameters,
    ) -> Result<Box<dyn Trainer>, String> {
        let width = params
            .get(confide_algorithms::trainer::INPUT_MEAN)
            .map(|t| t.data.len())
            .filter(|&w| w > 0)
            .ok_or("the model has no input.mean tensor (not a model of a built-in kind)")?;
        // The network is allocated before its tensors are checked against
        // it: an architecture (or a width, read from the tensors) that needs
        // more values than the tensors hold cannot be theirs, and would have
        // a deployment allocate any size (found by review).
        let raw: confide_algorithms::trainer::RawModel = model.clone().into();
        if let Some(needed) = raw.values_at_width(width as u64)
            && needed > params.num_values() as u64
        {
            return Err(format!(
                "at the tensors' width of {width} the architecture has {needed} values; the tensors hold {}",
                params.num_values()
            ));
        }
        let probe = Dataset { features: vec![0.0; width], labels: vec![0], num_features: width };
        let none = Dataset { features: Vec::new(), labels: Vec::new(), num_features: width };
        let mut m = self.build_model(model, 0, probe, none, "inference")?;
        m.set_parameters(params).map_err(|e| format!("the tensors are not this architecture's: {e}"))?;
        Ok(m)
    }
}

/// A DP job's width, fixed before any row is read: the spec's
/// `dp.feature_ranges`' or the data set's declared `features`, refused when
/// they disagree (neither is about the rows); `None` when neither fixes it.
pub fn dp_width(spec: &JobSpec, data: &DatasetSource) -> Result<Option<usize>, String> {
    let ranges = spec.dp.as_ref().and_then(|d| d.feature_ranges.as_ref()).map(Vec::len);
    match (ranges, data.features) {
        (Some(r), Some(d)) if r != d => {
            Err(format!("the spec's dp.feature_ranges has {r} ranges; this party's data set declares {d} features"))
        }
        (width, declared) => Ok(width.or(declared)),
    }
}

/// The data set as job `spec` reads it. Under `[dp]`, a row that fails a
/// check of its own is dropped, whatever trainer reads it, since whether a
/// job is refused must not depend on one row ([`RowRules`]), at the width
/// [`dp_width`] fixes. A DP job needs that width (the policy refuses the
/// offer without it): taken from the rows, a well-formed row of another
/// width placed first would change which rows are read. Without DP, a
/// label outside the model's classes fails the job naming its file and
/// line.
pub fn rows_for_job(spec: &JobSpec, data: &DatasetSource) -> Result<DatasetSource, String> {
    let mut data = data.clone();
    if spec.dp.is_none() {
        data.label_classes = Some(spec.model.classes);
        return Ok(data);
    }
    let features = dp_width(spec, &data)?.ok_or_else(|| width_undeclared(spec))?;
    data.drop_invalid_rows = Some(RowRules { features, classes: spec.model.classes });
    Ok(data)
}

/// Refuses `spec`'s model when, at this party's width of `features`, it
/// has more values than `limits.max_values`: the spec's own check counts
/// one input feature, and the party would allocate the model at its real
/// width (found by review: a wide `dp.feature_ranges` times a wide hidden
/// layer passed the spec's check and allocated gigabytes).
pub fn check_model_size(spec: &JobSpec, features: usize, limits: &confide_proto::Limits) -> Result<(), String> {
    let raw: confide_algorithms::trainer::RawModel = spec.model.clone().into();
    match raw.values_at_width(features as u64) {
        Some(values) if values > limits.max_values as u64 => Err(format!(
            "model: at this party's {features} features the architecture has {values} values; the limit is {} \
             (limits.max_values)",
            limits.max_values
        )),
        _ => Ok(()),
    }
}

/// Why DP job `spec` is refused on a data set whose width nothing
/// declares (an evaluation's spec cannot give ranges: only the data set).
pub fn width_undeclared(spec: &JobSpec) -> String {
    let or_ranges = match spec.dp.as_ref().map(|d| d.release) {
        Some(confide_proto::dpspec::DpRelease::Evaluation) => "",
        _ => ", or give the spec's dp.feature_ranges",
    };
    format!(
        "a DP job reads rows only at a width fixed before any row is read: declare features = N (the features per \
         row, label excluded) in this data set's [datasets.NAME] of party.toml{or_ranges}"
    )
}

impl TrainerFactory for BuiltinTrainers {
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String> {
        let (train, held_out, dropped) = data
            .load_split_counted(spec.training.validation_fraction, spec.training.seed)
            .map_err(|e| e.to_string())?;
        if dropped > 0 && train.is_empty() && held_out.is_empty() {
            // Every row: a configuration fault, not the rows' (the count
            // stays in this party's log; `confide-party check` shows why).
            tracing::error!(party, dataset = %data.path.display(), dropped, "every row failed its own checks and was left out of this DP job: check the data set's features and label_column (confide-party check)");
        } else if dropped > 0 {
            // The count stays in this party's log.
            tracing::warn!(party, dataset = %data.path.display(), dropped, "rows that failed their own checks were left out of this DP job");
        }
        // Without DP, no training rows is a refusal that says so; a DP job
        // sets up on none (DP-SGD then sends noise alone), since whether it
        // does must not depend on whether one row is there.
        if spec.dp.is_none() && train.is_empty() {
            return Err(format!("{}: no training rows", data.path.display()));
        }
        // Held-out rows asked for and none fell on that side: evaluate
        // none, not (the trainers' fallback) every training row.
        let none_held_out = spec.training.validation_fraction > 0.0 && held_out.is_empty() && !data.all_held_out;
        let trainer =
            self.build_from(spec, train, held_out, party).map_err(|e| format!("{}: {e}", data.path.display()))?;
        Ok(if none_held_out { Box::new(NoHeldOutRows(trainer)) } else { trainer })
    }
}

/// A trainer whose held-out rows, split off at a positive
/// `validation_fraction`, came out empty: it evaluates no rows, where the
/// built-in trainers fall back to the training rows. Each row's side is a
/// function of that row alone, so whether any row is held out depends on
/// the rows: with the fallback, one row added or removed could move an
/// evaluation from one row to the whole data set (a DP evaluation's counts
/// with it, far beyond their sensitivity).
struct NoHeldOutRows(Box<dyn Trainer>);

impl Trainer for NoHeldOutRows {
    fn parameters(&self) -> Result<confide_algorithms::Parameters, confide_algorithms::Error> {
        self.0.parameters()
    }
    fn set_parameters(&mut self, params: &confide_algorithms::Parameters) -> Result<(), confide_algorithms::Error> {
        self.0.set_parameters(params)
    }
    fn feature_stats(&self) -> confide_algorithms::FeatureStats {
        self.0.feature_stats()
    }
    fn fit(
        &mut self,
        config: &confide_algorithms::FitConfig,
    ) -> Result<confide_algorithms::FitOutcome, confide_algorithms::Error> {
        self.0.fit(config)
    }
    fn supports_dp_sgd(&self) -> bool {
        self.0.supports_dp_sgd()
    }
    fn dp_sgd_support(&self) -> Result<(), String> {
        self.0.dp_sgd_support()
    }
    fn fit_private(
        &mut self,
        config: &confide_algorithms::FitConfig,
        plan: &confide_algorithms::DpSgdPlan,
    ) -> Result<confide_algorithms::FitOutcome, confide_algorithms::Error> {
        self.0.fit_private(config, plan)
    }
    fn evaluate(&mut self) -> Result<confide_algorithms::EvalOutcome, confide_algorithms::Error> {
        // The metrics every built-in classifier reports, over no rows: a
        // DP evaluation releases the same counts (rows, rows correct) as
        // over some.
        let metrics = [("accuracy".to_string(), 0.0)].into();
        Ok(confide_algorithms::EvalOutcome { num_examples: 0, loss: 0.0, metrics })
    }
    fn predict(&self, features: &[f32]) -> Result<Vec<f32>, confide_algorithms::Error> {
        self.0.predict(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::{ModelConfig, Parameters, Tensor};

    /// A deployment's architecture that needs more values than its tensors
    /// hold (here 16 layers of 65,536, about 6.9e10 values, or a width of
    /// a million read from `input.mean`) is refused before the network is
    /// built: it was allocated first, then checked (found by review).
    #[test]
    fn an_inference_model_larger_than_its_tensors_is_refused_before_it_is_built() {
        let trainers = BuiltinTrainers::new(Default::default(), 1);
        let small = |width: usize| {
            Parameters::new(vec![
                Tensor { name: "input.mean".into(), shape: vec![width], data: vec![0.0; width] },
                Tensor { name: "input.std".into(), shape: vec![width], data: vec![1.0; width] },
            ])
            .unwrap()
        };
        let huge = ModelConfig::mlp(2, vec![65_536; 16]);
        let e = trainers.inference_model(&huge, &small(4)).err().expect("refused");
        assert!(e.contains("the tensors hold 8"), "{e}");
        let wide = trainers.inference_model(&ModelConfig::mlp(2, vec![64]), &small(1_000_000)).err().expect("refused");
        assert!(wide.contains("width of 1000000"), "{wide}");
    }
}
