//! Example-level DP for a federated evaluation: what a party releases about
//! its held-out rows is two counts, each with exact discrete Gaussian noise.
//!
//! A party evaluating a model learns, per row, whether it was classified
//! correctly. It releases the number of rows `n` and the number classified
//! correctly `c`. One row added or removed moves `(n, c)` by `(1, 0)` or
//! `(1, 1)`: L2 sensitivity at most √2, and both are integers, so the
//! multivariate discrete Gaussian with σ² = 2z² per coordinate is
//! ρ-zCDP with ρ = Δ₂²/(2σ²) = 1/(2z²) (Canonne, Kamath, Steinke 2020,
//! Theorem 14): the Gaussian mechanism's RDP at noise multiplier z, which
//! the accountants compose as a discrete Gaussian sampled with q = 1.
//!
//! The loss is not released: a row's loss is unbounded (cross-entropy), so
//! its sum has no sensitivity; nor is AUC, which is not a sum over rows.
//! Accuracy is the post-processing `c / n` of the two noisy counts.

use rand::CryptoRng;

use crate::Error;
use crate::rdp::DpEvent;
use crate::sampler::DiscreteGaussian;

/// The squared L2 sensitivity of `(n, c)` to one row added or removed.
pub const COUNTS_SENSITIVITY_SQ: u64 = 2;

/// The grid noise multipliers are rounded up to (never down: the accounted
/// z is the one drawn).
const Z_GRID: f64 = 1024.0;

/// The mechanism: discrete Gaussian noise of variance 2z² on each count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoisyCounts {
    noise: DiscreteGaussian,
    noise_multiplier: f64,
}

/// One party's noisy release: the counts may be negative or exceed the
/// truth; only their sums over parties mean anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoisyEvaluation {
    /// Rows evaluated, plus noise.
    pub examples: i64,
    /// Rows classified correctly, plus noise (`None` when the trainer
    /// reports no accuracy: then nothing about correctness is released).
    pub correct: Option<i64>,
}

impl NoisyCounts {
    /// The mechanism at noise multiplier `z` (σ = z·√2 per count), with z
    /// rounded up to a multiple of 2^-10.
    pub fn new(z: f64) -> Result<Self, Error> {
        if !(z.is_finite() && z > 0.0 && z <= crate::dpsgd::MAX_NOISE_MULTIPLIER) {
            return Err(Error::InvalidInput(format!(
                "evaluation noise multiplier must be in (0, {}] (got {z})",
                crate::dpsgd::MAX_NOISE_MULTIPLIER
            )));
        }
        // σ² = 2·(m / 2^10)² = 2m² / 2^20, exactly.
        let m = (z * Z_GRID).ceil() as u64;
        let noise = DiscreteGaussian::with_variance(COUNTS_SENSITIVITY_SQ * m * m, (Z_GRID * Z_GRID) as u64)?;
        Ok(NoisyCounts { noise, noise_multiplier: m as f64 / Z_GRID })
    }

    /// The noise multiplier drawn with (z rounded up to the grid).
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// σ of each count's noise.
    pub fn stddev(&self) -> f64 {
        self.noise.variance().sqrt()
    }

    /// The accountants' event for one release.
    pub fn event(&self) -> DpEvent {
        event(self.noise_multiplier)
    }

    /// Releases `examples` rows of which `correct` (when known) were
    /// classified correctly, each with fresh noise from `rng`.
    pub fn release<R: CryptoRng + ?Sized>(
        &self,
        examples: u64,
        correct: Option<u64>,
        rng: &mut R,
    ) -> Result<NoisyEvaluation, Error> {
        let count =
            |v: u64| i64::try_from(v).map_err(|_| Error::InvalidInput(format!("an evaluation count of {v} rows")));
        if correct.is_some_and(|c| c > examples) {
            return Err(Error::InvalidInput("more rows classified correctly than evaluated".into()));
        }
        let examples = count(examples)?.saturating_add(self.noise.sample(rng));
        let correct = match correct {
            Some(c) => Some(count(c)?.saturating_add(self.noise.sample(rng))),
            None => None,
        };
        Ok(NoisyEvaluation { examples, correct })
    }
}

/// The accountants' event for one release at noise multiplier `z` (after
/// rounding up to the grid, as [`NoisyCounts::new`] draws).
pub fn event(z: f64) -> DpEvent {
    DpEvent::PoissonSampledDiscreteGaussian { sampling_rate: 1.0, noise_multiplier: (z * Z_GRID).ceil() / Z_GRID }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdp::RdpAccountant;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn the_noise_has_the_calibrated_variance_and_no_bias() {
        let m = NoisyCounts::new(3.0).unwrap();
        assert_eq!(m.noise_multiplier(), 3.0);
        assert!((m.stddev() - 3.0 * 2f64.sqrt()).abs() < 1e-12);
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let n = 20_000;
        let (mut s, mut sq, mut sc, mut sqc, mut cross) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for _ in 0..n {
            let r = m.release(1000, Some(900), &mut rng).unwrap();
            let e = (r.examples - 1000) as f64;
            let c = (r.correct.unwrap() - 900) as f64;
            s += e;
            sq += e * e;
            sc += c;
            sqc += c * c;
            cross += e * c;
        }
        let (mean, var) = (s / n as f64, sq / n as f64);
        // σ² = 18: the sample mean's s.d. is 0.03 and the variance's ≈ 0.18.
        assert!(mean.abs() < 0.15, "{mean}");
        assert!((var - 18.0).abs() < 0.9, "{var}");
        // The rows-right count gets its own noise, at the same σ: a shared
        // draw would release n − c exactly (the covariance's s.d. is 0.13).
        let (mean_c, var_c, cov) = (sc / n as f64, sqc / n as f64, cross / n as f64);
        assert!(mean_c.abs() < 0.15, "{mean_c}");
        assert!((var_c - 18.0).abs() < 0.9, "{var_c}");
        assert!(cov.abs() < 0.9, "the two counts' noise covaries: {cov}");
    }

    #[test]
    fn z_rounds_up_and_the_event_is_the_gaussian_curve() {
        let m = NoisyCounts::new(1.0001).unwrap();
        assert!(m.noise_multiplier() >= 1.0001 && m.noise_multiplier() < 1.0001 + 1.0 / 1024.0);
        assert_eq!(m.event(), event(1.0001));
        // At q = 1 the discrete Gaussian costs α/(2z²) at each order: one
        // release at z = 2 is ρ = 1/8 zCDP.
        let mut acc = RdpAccountant::with_orders(crate::rdp::integer_orders()).unwrap();
        acc.compose(&event(2.0), 1).unwrap();
        let (eps, _) = acc.epsilon(1e-5).unwrap();
        let mut reference = RdpAccountant::with_orders(crate::rdp::integer_orders()).unwrap();
        reference.compose(&DpEvent::Gaussian { noise_multiplier: 2.0 }, 1).unwrap();
        assert!((eps - reference.epsilon(1e-5).unwrap().0).abs() < 1e-9, "{eps}");
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(NoisyCounts::new(0.0).is_err());
        assert!(NoisyCounts::new(f64::NAN).is_err());
        assert!(NoisyCounts::new(5000.0).is_err());
        let m = NoisyCounts::new(1.0).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert!(m.release(5, Some(6), &mut rng).is_err());
        assert!(m.release(u64::MAX, None, &mut rng).is_err());
        assert_eq!(m.release(5, None, &mut rng).unwrap().correct, None);
    }
}
