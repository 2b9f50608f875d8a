//! A custom local [`Trainer`] in a party build of your own.
//!
//! `LinearSvm` is a binary linear support-vector machine trained with SGD on
//! the hinge loss, in plain Rust. It shows what a trainer owes the federation:
//!
//! * its parameters as named tensors in a fixed order, identical in names and
//!   shapes at every party (checked before round 1);
//! * `input.mean`/`input.std`, which the coordinator fills with federated
//!   feature statistics (from per-party sums, never rows);
//! * `fit` from the parameters it was given, `evaluate` on rows it held out,
//!   and counts and metrics — never rows.
//!
//! This file is a complete `confide-party` binary: the same CLI, with the
//! trainer registered for jobs whose spec says
//!
//! ```toml
//! [model]
//! kind = "custom"
//! custom = "linear-svm"
//! classes = 2
//! ```
//!
//! and the built-in trainers for every other job. Run it where you would run
//! `confide-party`:
//! `cargo run -p confide-tests --example custom_trainer -- run --config party.toml`.
//! `tests/tests/examples.rs` runs it in a federation in CI.

use std::sync::Arc;

use confide_algorithms::data::{Dataset, DatasetSource};
use confide_algorithms::trainer::{INPUT_MEAN, INPUT_STD, row_count};
use confide_algorithms::{
    Architecture, Error, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Metrics, Parameters, Tensor, Trainer,
};
use confide_party::trainers::{BuiltinTrainers, TrainerFactory, party_salt};
use confide_proto::jobspec::JobSpec;
use rand::SeedableRng;
use rand::seq::SliceRandom;

const WEIGHT: &str = "svm.weight";
const BIAS: &str = "svm.bias";

/// score(x) = w·((x − mean)/std) + b; class 1 when the score is positive.
struct LinearSvm {
    params: Parameters,
    features: usize,
    train: Dataset,
    held_out: Dataset,
    /// The spec holds out no rows (`validation_fraction = 0`): evaluate the
    /// training rows. Decided by the spec, never by whether the split
    /// happened to hold out any row: that depends on the rows, and one row
    /// could then move an evaluation from one row to all of them.
    evaluate_training_rows: bool,
    salt: u64,
}

impl LinearSvm {
    fn new(train: Dataset, held_out: Dataset, evaluate_training_rows: bool, salt: u64) -> Result<Self, Error> {
        if let Some(l) = train.labels.iter().chain(&held_out.labels).find(|&&l| l > 1) {
            return Err(Error::InvalidInput(format!("linear-svm is binary; found label {l}")));
        }
        let d = train.num_features.max(held_out.num_features);
        if d == 0 {
            return Err(Error::InvalidInput("no rows and no declared width".into()));
        }
        // Zero is a fine start for a convex model, and identical at every party.
        let params = Parameters::new(vec![
            Tensor { name: INPUT_MEAN.into(), shape: vec![d], data: vec![0.0; d] },
            Tensor { name: INPUT_STD.into(), shape: vec![d], data: vec![1.0; d] },
            Tensor { name: WEIGHT.into(), shape: vec![d], data: vec![0.0; d] },
            Tensor { name: BIAS.into(), shape: vec![1], data: vec![0.0] },
        ])?;
        Ok(LinearSvm { params, features: d, train, held_out, evaluate_training_rows, salt })
    }

    fn get(&self, name: &str) -> &[f32] {
        self.params.get(name).map(|t| t.data.as_slice()).unwrap_or_default()
    }

    /// The row, standardised.
    fn x(&self, row: &[f32]) -> Vec<f64> {
        let (mean, std) = (self.get(INPUT_MEAN), self.get(INPUT_STD));
        row.iter().zip(mean).zip(std).map(|((v, m), s)| f64::from((v - m) / s)).collect()
    }

    fn score(&self, row: &[f32]) -> f64 {
        let w = self.get(WEIGHT);
        self.x(row).iter().zip(w).map(|(x, w)| x * f64::from(*w)).sum::<f64>() + f64::from(self.get(BIAS)[0])
    }
}

/// Labels 0/1 as −1/+1.
fn sign(label: u32) -> f64 {
    if label == 1 { 1.0 } else { -1.0 }
}

impl Trainer for LinearSvm {
    fn parameters(&self) -> Result<Parameters, Error> {
        Ok(self.params.clone())
    }

    fn set_parameters(&mut self, params: &Parameters) -> Result<(), Error> {
        params.check_matches(&self.params.spec()).map_err(Error::InvalidInput)?;
        if params.get(INPUT_STD).is_some_and(|t| t.data.iter().any(|v| v.is_nan() || *v <= 0.0)) {
            return Err(Error::InvalidInput(format!("{INPUT_STD} must be positive")));
        }
        self.params = params.clone();
        Ok(())
    }

    fn feature_stats(&self) -> FeatureStats {
        self.train.feature_stats()
    }

    /// Mini-batch SGD on the hinge loss max(0, 1 − y·score) + l2/2·‖w‖².
    fn fit(&mut self, config: &FitConfig) -> Result<FitOutcome, Error> {
        let tc = &config.train;
        let mut w: Vec<f64> = self.get(WEIGHT).iter().map(|v| f64::from(*v)).collect();
        let mut b = f64::from(self.get(BIAS)[0]);
        let xs: Vec<Vec<f64>> = (0..self.train.len()).map(|i| self.x(self.train.row(i))).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(tc.seed ^ self.salt ^ u64::from(config.round));
        let mut order: Vec<usize> = (0..xs.len()).collect();
        let (mut loss, mut seen) = (0.0, 0usize);
        for _ in 0..tc.local_epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(tc.batch_size) {
                let (mut gw, mut gb) = (vec![0.0; self.features], 0.0);
                for &i in batch {
                    let y = sign(self.train.labels[i]);
                    let margin = y * (xs[i].iter().zip(&w).map(|(x, w)| x * w).sum::<f64>() + b);
                    if margin < 1.0 {
                        loss += 1.0 - margin;
                        gw.iter_mut().zip(&xs[i]).for_each(|(g, x)| *g -= y * x);
                        gb -= y;
                    }
                }
                let n = batch.len() as f64;
                w.iter_mut().zip(&gw).for_each(|(w, g)| *w -= tc.learning_rate * (g / n + tc.l2 * *w));
                b -= tc.learning_rate * gb / n;
                seen += batch.len();
            }
        }
        for (name, values) in self.params.values_mut() {
            match name {
                WEIGHT => values.iter_mut().zip(&w).for_each(|(v, w)| *v = *w as f32),
                BIAS => values[0] = b as f32,
                _ => {}
            }
        }
        let metrics = Metrics::from([("train_loss".to_string(), loss / seen.max(1) as f64)]);
        Ok(FitOutcome { num_examples: self.train.len() as u64, metrics })
    }

    fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
        let ds = if self.evaluate_training_rows { &self.train } else { &self.held_out };
        let (mut loss, mut correct) = (0.0, 0usize);
        for i in 0..ds.len() {
            let (y, s) = (sign(ds.labels[i]), self.score(ds.row(i)));
            loss += (1.0 - y * s).max(0.0);
            correct += usize::from((s > 0.0) == (y > 0.0));
        }
        let n = ds.len().max(1) as f64;
        let metrics = Metrics::from([("accuracy".to_string(), correct as f64 / n)]);
        Ok(EvalOutcome { num_examples: ds.len() as u64, loss: loss / n, metrics })
    }

    /// [P(class 0), P(class 1)] per row, squashing the margin with a logistic.
    fn predict(&self, features: &[f32]) -> Result<Vec<f32>, Error> {
        row_count(features, self.features)?;
        Ok(features
            .chunks(self.features)
            .flat_map(|row| {
                let p = 1.0 / (1.0 + (-self.score(row)).exp());
                [(1.0 - p) as f32, p as f32]
            })
            .collect())
    }
}

/// `linear-svm` for `kind = "custom"`, the built-in trainers otherwise.
struct Trainers {
    builtin: BuiltinTrainers,
}

impl TrainerFactory for Trainers {
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String> {
        if !matches!(&spec.model.architecture, Architecture::Custom { trainer } if trainer == "linear-svm") {
            return self.builtin.build(spec, data, party);
        }
        if spec.model.classes != 2 {
            return Err(format!("model.classes: linear-svm is binary (got {})", spec.model.classes));
        }
        let rows = data.load().map_err(|e| e.to_string())?;
        let (train, held_out) = rows.split(spec.training.validation_fraction, spec.training.seed);
        // Under DP a trainer sets up on no rows (whether it does must not
        // depend on one row); without DP, no training rows is a refusal.
        if spec.dp.is_none() && train.is_empty() {
            return Err(format!("{}: no training rows", data.path.display()));
        }
        let whole = spec.training.validation_fraction == 0.0;
        let svm = LinearSvm::new(train, held_out, whole, party_salt(party))
            .map_err(|e| format!("{}: {e}", data.path.display()))?;
        Ok(Box::new(svm))
    }
}

fn main() {
    let builtin = BuiltinTrainers::new(Default::default(), 1);
    let plugins = confide_party::plugins::PartyPlugins::new().trainers(Arc::new(Trainers { builtin }));
    confide_party::cli::main_with(plugins)
}
