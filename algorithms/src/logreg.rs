//! Multinomial logistic regression in pure Rust: a real, convex model that lets
//! the whole federation run and be tested without libtorch.

use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::data::Dataset;
use crate::trainer::{INPUT_MEAN, INPUT_STD, classification_outcome, row_count};
use crate::{
    Error, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Metrics, Parameters, Tensor, TensorSpec, Trainer,
};

/// Softmax regression `p = softmax(W·((x − mean)/std) + b)` trained with
/// mini-batch SGD. `mean`/`std` are frozen tensors set from federated
/// statistics, so the saved model carries its own preprocessing.
pub struct LogisticRegression {
    classes: usize,
    features: usize,
    params: Parameters,
    train: Dataset,
    held_out: Dataset,
    /// Mixed into shuffling seeds so parties draw different (but reproducible) batches.
    salt: u64,
}

const WEIGHT: &str = "linear.weight";
const BIAS: &str = "linear.bias";

impl LogisticRegression {
    /// A model for `classes` classes over `train`'s features, initialised
    /// from `seed` (identically at every party). `salt` distinguishes parties'
    /// shuffling.
    pub fn new(classes: usize, train: Dataset, held_out: Dataset, seed: u64, salt: u64) -> Result<Self, Error> {
        if classes < 2 {
            return Err(Error::InvalidInput(format!("classes: need at least 2 (got {classes})")));
        }
        for ds in [&train, &held_out] {
            if let Some(l) = ds.labels.iter().find(|&&l| l as usize >= classes) {
                return Err(Error::InvalidInput(format!("label {l} is outside the model's {classes} classes")));
            }
        }
        if train.is_empty() {
            return Err(Error::InvalidInput("no training rows".into()));
        }
        let d = train.num_features;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let scale = 0.01f32;
        let weight: Vec<f32> =
            (0..classes * d).map(|_| (rand::Rng::random::<f32>(&mut rng) * 2.0 - 1.0) * scale).collect();
        let params = Parameters::new(vec![
            Tensor { name: INPUT_MEAN.into(), shape: vec![d], data: vec![0.0; d] },
            Tensor { name: INPUT_STD.into(), shape: vec![d], data: vec![1.0; d] },
            Tensor { name: WEIGHT.into(), shape: vec![classes, d], data: weight },
            Tensor { name: BIAS.into(), shape: vec![classes], data: vec![0.0; classes] },
        ])?;
        Ok(LogisticRegression { classes, features: d, params, train, held_out, salt })
    }

    fn tensor(&self, name: &str) -> &[f32] {
        self.params.get(name).map(|t| t.data.as_slice()).unwrap_or(&[])
    }

    /// Class probabilities of one row, written into `out`.
    fn probs(&self, row: &[f32], out: &mut [f64]) {
        let (mean, std) = (self.tensor(INPUT_MEAN), self.tensor(INPUT_STD));
        let (w, b) = (self.tensor(WEIGHT), self.tensor(BIAS));
        let d = self.features;
        for k in 0..self.classes {
            let mut z = b[k] as f64;
            for j in 0..d {
                z += w[k * d + j] as f64 * ((row[j] - mean[j]) / std[j]) as f64;
            }
            out[k] = z;
        }
        let max = out.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut sum = 0.0;
        for v in out.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in out.iter_mut() {
            *v /= sum;
        }
    }

    fn score(&self, ds: &Dataset) -> (f64, f64, Vec<f64>) {
        let mut p = vec![0.0; self.classes];
        let (mut loss, mut correct) = (0.0, 0usize);
        let mut positive_scores = Vec::with_capacity(ds.len());
        for i in 0..ds.len() {
            self.probs(ds.row(i), &mut p);
            let y = ds.labels[i] as usize;
            loss -= p[y].max(1e-12).ln();
            let argmax = (0..self.classes).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
            correct += usize::from(argmax == y);
            positive_scores.push(p[self.classes - 1]);
        }
        let n = ds.len().max(1) as f64;
        (loss / n, correct as f64 / n, positive_scores)
    }
}

/// Area under the ROC curve for binary labels (Mann–Whitney U, ties averaged).
pub fn roc_auc(scores: &[f64], labels: &[u32]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = avg;
        }
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&l| l == 1).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks.iter().zip(labels).filter(|(_, l)| **l == 1).map(|(r, _)| r).sum();
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

impl Trainer for LogisticRegression {
    fn parameters(&self) -> Result<Parameters, Error> {
        Ok(self.params.clone())
    }

    fn set_parameters(&mut self, params: &Parameters) -> Result<(), Error> {
        params.check_matches(&self.params.spec()).map_err(Error::InvalidInput)?;
        if let Some(s) = params.get(INPUT_STD).and_then(|t| t.data.iter().find(|v| **v <= 0.0)) {
            return Err(Error::InvalidInput(format!("{INPUT_STD} holds {s}; it must be positive")));
        }
        self.params = params.clone();
        Ok(())
    }

    fn feature_stats(&self) -> FeatureStats {
        self.train.feature_stats()
    }

    fn fit(&mut self, config: &FitConfig) -> Result<FitOutcome, Error> {
        let tc = &config.train;
        let (c, d) = (self.classes, self.features);
        let lr = tc.learning_rate;
        let mut w: Vec<f64> = self.tensor(WEIGHT).iter().map(|&v| v as f64).collect();
        let mut b: Vec<f64> = self.tensor(BIAS).iter().map(|&v| v as f64).collect();
        let (mean, std): (Vec<f64>, Vec<f64>) = (
            self.tensor(INPUT_MEAN).iter().map(|&v| v as f64).collect(),
            self.tensor(INPUT_STD).iter().map(|&v| v as f64).collect(),
        );
        // FedProx anchors: the parameters this round started from.
        let (w0, b0) = (w.clone(), b.clone());
        let (mu, momentum) = (tc.proximal_mu, tc.momentum);
        let (mut vw, mut vb) = (vec![0.0; c * d], vec![0.0; c]);
        let seed = tc.seed ^ self.salt ^ (u64::from(config.round) << 32);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        let (mut gw, mut gb) = (vec![0.0; c * d], vec![0.0; c]);
        let (mut x, mut z) = (vec![0.0; d], vec![0.0; c]);
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for _ in 0..tc.local_epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(tc.batch_size) {
                gw.iter_mut().for_each(|g| *g = 0.0);
                gb.iter_mut().for_each(|g| *g = 0.0);
                for &i in batch {
                    for (j, v) in self.train.row(i).iter().enumerate() {
                        x[j] = (*v as f64 - mean[j]) / std[j];
                    }
                    for k in 0..c {
                        z[k] = b[k] + (0..d).map(|j| w[k * d + j] * x[j]).sum::<f64>();
                    }
                    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                    let y = self.train.labels[i] as usize;
                    loss_sum += -(z[y] - max - sum.ln());
                    for k in 0..c {
                        let g = (z[k] - max).exp() / sum - f64::from(u8::from(k == y));
                        gb[k] += g;
                        for j in 0..d {
                            gw[k * d + j] += g * x[j];
                        }
                    }
                }
                seen += batch.len();
                let inv = 1.0 / batch.len() as f64;
                // ∇ = mean loss gradient + l2·w + μ·(w − w₀); heavy-ball
                // momentum v ← m·v + ∇ (PyTorch's convention), w ← w − lr·v.
                for (((wv, g), v), anchor) in w.iter_mut().zip(&gw).zip(&mut vw).zip(&w0) {
                    *v = momentum * *v + g * inv + tc.l2 * *wv + mu * (*wv - anchor);
                    *wv -= lr * *v;
                }
                for (((bv, g), v), anchor) in b.iter_mut().zip(&gb).zip(&mut vb).zip(&b0) {
                    *v = momentum * *v + g * inv + mu * (*bv - anchor);
                    *bv -= lr * *v;
                }
            }
        }
        for (name, values) in self.params.values_mut() {
            let src = match name {
                WEIGHT => &w,
                BIAS => &b,
                _ => continue,
            };
            for (dst, s) in values.iter_mut().zip(src) {
                *dst = *s as f32;
            }
        }
        let mut metrics = Metrics::new();
        metrics.insert("train_loss".into(), loss_sum / seen.max(1) as f64);
        Ok(FitOutcome { num_examples: self.train.len() as u64, metrics })
    }

    fn evaluate(&mut self) -> Result<EvalOutcome, Error> {
        let ds = if self.held_out.is_empty() { &self.train } else { &self.held_out };
        let (loss, accuracy, scores) = self.score(ds);
        Ok(classification_outcome(self.classes, &ds.labels, loss, accuracy, &scores))
    }

    fn predict(&self, features: &[f32]) -> Result<Vec<f32>, Error> {
        row_count(features, self.features)?;
        let mut p = vec![0.0; self.classes];
        let mut out = Vec::with_capacity(features.len() / self.features * self.classes);
        for row in features.chunks(self.features) {
            self.probs(row, &mut p);
            out.extend(p.iter().map(|&v| v as f32));
        }
        Ok(out)
    }
}

impl LogisticRegression {
    /// The names and shapes of this model (for architecture agreement).
    pub fn spec(&self) -> Vec<TensorSpec> {
        self.params.spec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TrainConfig;
    use crate::data::CsvOptions;
    use crate::trainer::apply_feature_stats;

    fn breast_cancer() -> Dataset {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/breast_cancer.csv");
        Dataset::load_csv(&path, &CsvOptions { header: true, label_column: -1 }).unwrap()
    }

    #[test]
    fn learns_breast_cancer() {
        let ds = breast_cancer();
        let (train, test) = ds.split(0.25, 1);
        let mut m = LogisticRegression::new(2, train.clone(), test, 3, 0).unwrap();
        let mut p = m.parameters().unwrap();
        apply_feature_stats(&mut p, &train.feature_stats()).unwrap();
        m.set_parameters(&p).unwrap();
        let before = m.evaluate().unwrap();
        let cfg = FitConfig { round: 1, train: TrainConfig { local_epochs: 5, ..TrainConfig::default() } };
        m.fit(&cfg).unwrap();
        let after = m.evaluate().unwrap();
        assert!(after.loss < before.loss);
        assert!(after.metrics["accuracy"] > 0.93, "{after:?}");
        assert!(after.metrics["auc"] > 0.97, "{after:?}");
        let probs = m.predict(&train.features[..60]).unwrap();
        assert_eq!(probs.len(), 4);
        assert!((probs[0] + probs[1] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn fit_is_deterministic_and_salted() {
        let ds = breast_cancer();
        let cfg = FitConfig { round: 2, train: TrainConfig { seed: 9, ..TrainConfig::default() } };
        let run = |salt| {
            let mut m = LogisticRegression::new(2, ds.clone(), Dataset::default(), 9, salt).unwrap();
            m.fit(&cfg).unwrap();
            m.parameters().unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn rejects_labels_outside_classes_and_bad_params() {
        let ds = Dataset { features: vec![1.0, 2.0], labels: vec![0, 3], num_features: 1 };
        assert!(LogisticRegression::new(2, ds.clone(), Dataset::default(), 0, 0).is_err());
        let mut m = LogisticRegression::new(4, ds, Dataset::default(), 0, 0).unwrap();
        let mut p = m.parameters().unwrap();
        p.values_mut().nth(1).unwrap().1[0] = 0.0;
        assert!(m.set_parameters(&p).is_err());
    }

    #[test]
    fn proximal_term_changes_the_second_step_as_the_formula_says() {
        // Two identical rows, batch 1, so the shuffle cannot matter. Step 1
        // starts at w₀ where μ(w − w₀) = 0; step 2 then differs by exactly
        // w₂ᵖʳᵒˣ − w₂ = −lr·μ·(w₁ − w₀).
        let row = [1.0f32, -2.0];
        let (lr, mu) = (0.5, 0.3);
        let run = |rows: usize, mu: f64| {
            let ds = Dataset { features: row.repeat(rows), labels: vec![1; rows], num_features: 2 };
            let mut m = LogisticRegression::new(2, ds, Dataset::default(), 4, 0).unwrap();
            let train = TrainConfig { batch_size: 1, learning_rate: lr, proximal_mu: mu, ..TrainConfig::default() };
            let start = m.parameters().unwrap();
            m.fit(&FitConfig { round: 1, train }).unwrap();
            (start, m.parameters().unwrap())
        };
        let (w0, w1) = run(1, mu);
        let (_, plain) = run(2, 0.0);
        let (_, prox) = run(2, mu);
        assert_ne!(plain, prox);
        for name in [WEIGHT, BIAS] {
            let v = |p: &Parameters| -> Vec<f64> { p.get(name).unwrap().data.iter().map(|&x| f64::from(x)).collect() };
            let (w0, w1, plain, prox) = (v(&w0), v(&w1), v(&plain), v(&prox));
            for i in 0..w0.len() {
                let expected = -lr * mu * (w1[i] - w0[i]);
                assert!(
                    (prox[i] - plain[i] - expected).abs() < 1e-6,
                    "{name}[{i}]: {} vs {expected}",
                    prox[i] - plain[i]
                );
            }
        }
    }

    #[test]
    fn auc_matches_hand_computed() {
        assert_eq!(roc_auc(&[0.1, 0.4, 0.35, 0.8], &[0, 0, 1, 1]), Some(0.75));
        assert_eq!(roc_auc(&[0.5, 0.5], &[0, 1]), Some(0.5));
        assert_eq!(roc_auc(&[0.5], &[1]), None);
    }
}
