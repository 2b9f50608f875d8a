//! Secure sums of statistics other than model updates: the per-feature sums
//! that standardise a model's inputs (setup) and the evaluation metrics of
//! each round. Under a protocol that hides individual updates these would
//! otherwise be a side channel (a party's row count, its feature means, its
//! accuracy on a model the coordinator chose), so they travel through the
//! same protocol and the coordinator learns only their sums.
//!
//! A statistic is a vector of f64 values whose meaning both sides derive on
//! their own: a [`SumLayout`] names its purpose and what it is about (the
//! model evaluated, the number of features), and its digest is bound into
//! the protocol's signatures, so parties asked for different things cannot
//! complete one sum. [`WideSum`] carries each value as a signed fixed-point
//! integer split into limbs narrow enough that the modular sum of every
//! party's limbs never wraps, so the sum is exact whatever its sign and
//! magnitude (up to ±2^46 per sum, far beyond any count or metric sum).

use confide_algorithms::{EvalOutcome, FeatureStats, Metrics, Parameters};

use crate::Error;

/// Values carry 16 fractional bits: feature sums to 1.5e-5, metrics to
/// better than 1e-6 after dividing by the example count.
const FRACTION_BITS: u32 = 16;

/// What a secure sum is of, as both sides derive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumLayout {
    /// `feature-stats` or `evaluation`.
    pub purpose: &'static str,
    /// A hash of what the values are about and of the purpose (bound into
    /// the protocol's signatures).
    pub digest: [u8; 32],
    /// Values per party.
    pub values: usize,
}

impl SumLayout {
    fn new(purpose: &'static str, about: &[u8], values: usize) -> Self {
        let mut h = blake3::Hasher::new_derive_key("confide secure sum layout v1");
        h.update(purpose.as_bytes());
        h.update(&[0]);
        h.update(&(values as u64).to_le_bytes());
        h.update(about);
        SumLayout { purpose, digest: *h.finalize().as_bytes(), values }
    }

    /// The setup statistics of a model over `features` inputs: the row
    /// count, then each feature's sum, then each feature's sum of squares.
    pub fn feature_stats(features: usize) -> Self {
        SumLayout::new("feature-stats", &[], 1 + 2 * features)
    }

    /// The evaluation of `global`: the example count, then for the loss
    /// and each of [`SECURE_METRICS`] the example-weighted sum and the
    /// examples of the parties that reported it.
    pub fn evaluation(global: &Parameters) -> Self {
        SumLayout::new("evaluation", &super::model_digest(global), 1 + 2 * (1 + SECURE_METRICS.len()))
    }
}

/// The evaluation metrics a secure evaluation sums (their example-weighted
/// means); other metrics a trainer reports stay at the party, because a
/// metric the layout does not fix would let the coordinator ask for any
/// value. Each is a fraction in [0, 1]; a value outside is refused.
pub const SECURE_METRICS: [&str; 2] = ["accuracy", "auc"];

// Losses above this are counted as this in a secure evaluation, as in
// training: one party's diverged loss cannot swamp the mean.
use super::update::LOSS_CAP;

/// A party's feature statistics as the values of [`SumLayout::feature_stats`].
pub fn feature_stats_values(stats: &FeatureStats) -> Vec<f64> {
    let mut v = Vec::with_capacity(1 + stats.sum.len() + stats.sum_sq.len());
    v.push(stats.count as f64);
    v.extend_from_slice(&stats.sum);
    v.extend_from_slice(&stats.sum_sq);
    v
}

/// The federation's feature statistics from the summed values.
pub fn feature_stats_from_sum(sum: &[f64]) -> Result<FeatureStats, Error> {
    let [count, rest @ ..] = sum else {
        return Err(Error::InvalidInput("an empty feature-statistics sum".into()));
    };
    if !rest.len().is_multiple_of(2) || count.is_nan() || *count < 0.0 {
        return Err(Error::InvalidInput(format!("a feature-statistics sum of {} values", sum.len())));
    }
    let (s, sq) = rest.split_at(rest.len() / 2);
    Ok(FeatureStats { count: count.round() as u64, sum: s.to_vec(), sum_sq: sq.to_vec() })
}

/// A party's evaluation as the values of [`SumLayout::evaluation`].
pub fn evaluation_values(outcome: &EvalOutcome) -> Result<Vec<f64>, Error> {
    let n = outcome.num_examples as f64;
    if !outcome.loss.is_finite() {
        // The value stays out of errors: they reach the coordinator.
        return Err(Error::InvalidInput("evaluation loss is not finite".into()));
    }
    let mut v = vec![n, n * outcome.loss.clamp(0.0, LOSS_CAP), n];
    for name in SECURE_METRICS {
        match outcome.metrics.get(name) {
            Some(&m) if (0.0..=1.0).contains(&m) => v.extend([n * m, n]),
            Some(_) => return Err(Error::InvalidInput(format!("evaluation metric {name} is not in [0, 1]"))),
            None => v.extend([0.0, 0.0]),
        }
    }
    Ok(v)
}

/// A party's noisy evaluation ([`confide_dp::evaluation`]) as the values of
/// [`SumLayout::evaluation`]: the noisy row count weighs the accuracy, the
/// loss and AUC are not released (their weights are 0, so the sum reports
/// neither).
pub fn noisy_evaluation_values(release: &confide_dp::evaluation::NoisyEvaluation) -> Vec<f64> {
    let n = release.examples as f64;
    let mut v = vec![n, 0.0, 0.0];
    for name in SECURE_METRICS {
        match (name, release.correct) {
            ("accuracy", Some(c)) => v.extend([c as f64, n]),
            _ => v.extend([0.0, 0.0]),
        }
    }
    v
}

/// The federation's evaluation from the summed values: total examples,
/// example-weighted mean loss, and the example-weighted mean of each
/// metric some party reported.
pub fn evaluation_from_sum(sum: &[f64]) -> Result<(u64, f64, Metrics), Error> {
    if sum.len() != 1 + 2 * (1 + SECURE_METRICS.len()) {
        return Err(Error::InvalidInput(format!("an evaluation sum of {} values", sum.len())));
    }
    let total = sum[0].round();
    if total < 1.0 {
        return Err(Error::InvalidInput("the evaluation sum holds no examples".into()));
    }
    let mean = |at: usize| (sum[at + 1].round() >= 1.0).then(|| sum[at] / sum[at + 1]);
    let loss = mean(1).unwrap_or(f64::NAN);
    let mut metrics = Metrics::new();
    for (i, name) in SECURE_METRICS.iter().enumerate() {
        if let Some(m) = mean(3 + 2 * i) {
            metrics.insert((*name).to_owned(), m.clamp(0.0, 1.0));
        }
    }
    Ok((total as u64, loss, metrics))
}

/// Signed fixed-point values summed exactly in Z_{2^bits}: each value is
/// a 64-bit two's-complement integer split into limbs of `bits − ⌈log2
/// parties⌉` bits, so that no limb's sum over the parties wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WideSum {
    limb_bits: u32,
    limbs: usize,
    max_parties: usize,
}

impl WideSum {
    /// The encoding for sums of at most `max_parties` parties in `bits`-bit words.
    pub fn new(bits: u32, max_parties: usize) -> Result<Self, Error> {
        let headroom = usize::BITS - max_parties.max(1).saturating_sub(1).leading_zeros();
        let limb_bits = bits.min(32).saturating_sub(headroom);
        if max_parties == 0 || limb_bits < 4 {
            return Err(Error::InvalidInput(format!("{bits}-bit words leave no room to sum {max_parties} parties")));
        }
        Ok(WideSum { limb_bits, limbs: 64usize.div_ceil(limb_bits as usize), max_parties })
    }

    /// Words per party for `values` values.
    pub fn words(&self, values: usize) -> usize {
        values * self.limbs
    }

    /// Encodes one party's values; a value too large for the sum of every
    /// party to stay exact, or not finite, is refused by its index.
    pub fn encode(&self, values: &[f64]) -> Result<Vec<u32>, Error> {
        let scale = f64::from(1u32 << FRACTION_BITS);
        // Every party at this bound still sums within ±2^62.
        let bound = (1u64 << 62) as f64 / self.max_parties as f64;
        let mask = (1u64 << self.limb_bits) - 1;
        let mut out = Vec::with_capacity(self.words(values.len()));
        for (i, v) in values.iter().enumerate() {
            let q = (v * scale).round();
            if !q.is_finite() || q.abs() > bound {
                // Which value, not what it is: the error reaches the
                // coordinator, and the sum is to hide it.
                return Err(Error::InvalidInput(format!(
                    "value {i} is too large to sum securely (beyond ±{:e})",
                    bound / scale
                )));
            }
            let mut u = (q as i64) as u64;
            for _ in 0..self.limbs {
                out.push((u & mask) as u32);
                u >>= self.limb_bits;
            }
        }
        Ok(out)
    }

    /// Decodes the sum of the parties' encodings.
    pub fn decode(&self, sum: &[u32]) -> Result<Vec<f64>, Error> {
        if !sum.len().is_multiple_of(self.limbs) {
            return Err(Error::InvalidInput(format!(
                "a sum of {} words is not whole {}-limb values",
                sum.len(),
                self.limbs
            )));
        }
        let scale = f64::from(1u32 << FRACTION_BITS);
        Ok(sum
            .chunks(self.limbs)
            .map(|limbs| {
                let mut total: u128 = 0;
                for (j, l) in limbs.iter().enumerate() {
                    total = total.wrapping_add(u128::from(*l) << (self.limb_bits as usize * j));
                }
                // Modulo 2^64, as two's complement: the true sum is within ±2^62.
                (total as u64 as i64) as f64 / scale
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn add(sum: &mut [u32], words: &[u32], bits: u32) {
        let mask = if bits == 32 { u32::MAX } else { (1u32 << bits) - 1 };
        for (s, w) in sum.iter_mut().zip(words) {
            *s = s.wrapping_add(*w) & mask;
        }
    }

    proptest! {
        #[test]
        fn wide_sums_are_exact_to_the_resolution_whatever_the_signs(
            bits in 16u32..=32,
            parties in proptest::collection::vec(proptest::collection::vec(-1e9f64..1e9, 3), 1..40),
        ) {
            let enc = WideSum::new(bits, 40).unwrap();
            let mut sum = vec![0u32; enc.words(3)];
            for p in &parties {
                add(&mut sum, &enc.encode(p).unwrap(), bits);
            }
            let decoded = enc.decode(&sum).unwrap();
            for j in 0..3 {
                let exact: f64 = parties.iter().map(|p| p[j]).sum();
                let step = parties.len() as f64 / 65536.0;
                prop_assert!((decoded[j] - exact).abs() <= step, "{} vs {}", decoded[j], exact);
            }
        }
    }

    #[test]
    fn values_that_could_overflow_the_sum_are_refused_by_index() {
        let enc = WideSum::new(32, 1000).unwrap();
        let err = enc.encode(&[1.0, 1e14]).unwrap_err().to_string();
        assert!(err.contains("value 1") && err.contains("too large"), "{err}");
        assert!(enc.encode(&[f64::NAN]).is_err());
        assert!(WideSum::new(16, 1 << 13).is_err(), "16 bits leave no room for 8192 parties");
    }

    #[test]
    fn layouts_differ_by_purpose_and_subject() {
        let a = Parameters::new(vec![confide_algorithms::Tensor { name: "w".into(), shape: vec![1], data: vec![0.0] }])
            .unwrap();
        let b = Parameters::new(vec![confide_algorithms::Tensor { name: "w".into(), shape: vec![1], data: vec![1.0] }])
            .unwrap();
        assert_ne!(SumLayout::evaluation(&a).digest, SumLayout::evaluation(&b).digest);
        assert_ne!(SumLayout::feature_stats(3).digest, SumLayout::feature_stats(4).digest);
        assert_eq!(SumLayout::feature_stats(3).values, 7);
    }

    #[test]
    fn evaluations_sum_into_example_weighted_means() {
        let outcome = |n: u64, loss: f64, acc: f64, auc: Option<f64>| {
            let mut metrics: Metrics = [("accuracy".to_string(), acc), ("f1".to_string(), 0.3)].into();
            if let Some(a) = auc {
                metrics.insert("auc".into(), a);
            }
            EvalOutcome { num_examples: n, loss, metrics }
        };
        let a = evaluation_values(&outcome(100, 0.5, 0.9, Some(0.95))).unwrap();
        let b = evaluation_values(&outcome(300, 1e9, 0.7, None)).unwrap();
        let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let (n, loss, metrics) = evaluation_from_sum(&sum).unwrap();
        assert_eq!(n, 400);
        assert!((loss - (50.0 + 300.0 * LOSS_CAP) / 400.0).abs() < 1e-9, "loss capped: {loss}");
        assert!((metrics["accuracy"] - (90.0 + 210.0) / 400.0).abs() < 1e-9);
        assert!((metrics["auc"] - 0.95).abs() < 1e-9, "over the parties that reported it");
        assert!(!metrics.contains_key("f1"), "metrics outside the layout stay at the party");
        let bad = evaluation_values(&outcome(10, 0.1, 1.5, None)).unwrap_err().to_string();
        assert!(bad.contains("accuracy is not in [0, 1]") && !bad.contains("1.5"), "the value stays out: {bad}");
    }

    #[test]
    fn noisy_evaluations_sum_to_an_accuracy_and_release_no_loss() {
        use confide_dp::evaluation::NoisyEvaluation;
        let a = noisy_evaluation_values(&NoisyEvaluation { examples: 103, correct: Some(88) });
        // A party whose trainer has no accuracy, and a noisy count below 0.
        let b = noisy_evaluation_values(&NoisyEvaluation { examples: -2, correct: None });
        let c = noisy_evaluation_values(&NoisyEvaluation { examples: 298, correct: Some(212) });
        let sum: Vec<f64> = (0..a.len()).map(|i| a[i] + b[i] + c[i]).collect();
        let (n, loss, metrics) = evaluation_from_sum(&sum).unwrap();
        assert_eq!(n, 399);
        assert!(loss.is_nan(), "no loss released");
        assert!((metrics["accuracy"] - 300.0 / 401.0).abs() < 1e-12, "{metrics:?}");
        assert!(!metrics.contains_key("auc"));
    }

    #[test]
    fn feature_stats_round_trip() {
        let s = FeatureStats { count: 5, sum: vec![1.0, -2.0], sum_sq: vec![3.0, 4.0] };
        assert_eq!(feature_stats_from_sum(&feature_stats_values(&s)).unwrap(), s);
    }
}
