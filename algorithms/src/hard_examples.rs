//! Hard-example mining for joint (edge–cloud) inference: which of the edge
//! model's answers are unsure enough to ask the cloud model instead.
//!
//! The rules follow KubeEdge Sedna's filters, on the edge model's class
//! probabilities `p` (sorted, `p₁ ≥ p₂ ≥ …`):
//!
//! * `confidence`: hard when `p₁ < threshold` (Sedna's threshold filter);
//! * `margin`: hard when `p₁ − p₂ < threshold`;
//! * `entropy`: hard when the normalised entropy `−Σ pᵢ ln pᵢ / ln k` exceeds
//!   `threshold` (Sedna's cross-entropy filter; normalised so that one
//!   threshold in (0, 1) means the same for any class count `k`).

use serde::{Deserialize, Serialize};

/// A hard-example rule and its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case", deny_unknown_fields)]
pub enum HardExampleRule {
    /// Hard when the top probability is below `threshold`, in (0, 1].
    Confidence {
        /// The least top probability of an easy example.
        threshold: f64,
    },
    /// Hard when the top two probabilities are closer than `threshold`, in (0, 1].
    Margin {
        /// The least margin of an easy example.
        threshold: f64,
    },
    /// Hard when the normalised entropy exceeds `threshold`, in [0, 1).
    Entropy {
        /// The most normalised entropy of an easy example.
        threshold: f64,
    },
}

impl HardExampleRule {
    /// The rule's name.
    pub fn name(&self) -> &'static str {
        match self {
            HardExampleRule::Confidence { .. } => "confidence",
            HardExampleRule::Margin { .. } => "margin",
            HardExampleRule::Entropy { .. } => "entropy",
        }
    }

    /// The threshold.
    pub fn threshold(&self) -> f64 {
        match *self {
            HardExampleRule::Confidence { threshold }
            | HardExampleRule::Margin { threshold }
            | HardExampleRule::Entropy { threshold } => threshold,
        }
    }

    /// Checks the threshold's range; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.threshold();
        let ok = t.is_finite()
            && match self {
                HardExampleRule::Confidence { .. } | HardExampleRule::Margin { .. } => t > 0.0 && t <= 1.0,
                HardExampleRule::Entropy { .. } => (0.0..1.0).contains(&t),
            };
        if ok {
            Ok(())
        } else {
            let range = if matches!(self, HardExampleRule::Entropy { .. }) { "[0, 1)" } else { "(0, 1]" };
            Err(format!("threshold: the {} rule takes a threshold in {range} (got {t})", self.name()))
        }
    }

    /// The rule's score of one row's probabilities: hard when above the
    /// threshold for `entropy`, below it otherwise.
    pub fn score(&self, probs: &[f32]) -> f64 {
        let (mut top1, mut top2) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
        for &p in probs {
            let p = f64::from(p);
            if p > top1 {
                (top1, top2) = (p, top1);
            } else if p > top2 {
                top2 = p;
            }
        }
        match self {
            HardExampleRule::Confidence { .. } => top1,
            HardExampleRule::Margin { .. } => top1 - top2.max(0.0),
            HardExampleRule::Entropy { .. } => {
                let k = probs.len();
                if k < 2 {
                    return 0.0;
                }
                let h: f64 = probs.iter().map(|&p| f64::from(p)).filter(|&p| p > 0.0).map(|p| -p * p.ln()).sum();
                h / (k as f64).ln()
            }
        }
    }

    /// Whether a row with these class probabilities is hard. Probabilities
    /// that are not finite are always hard.
    pub fn is_hard(&self, probs: &[f32]) -> bool {
        if probs.is_empty() || probs.iter().any(|p| !p.is_finite()) {
            return true;
        }
        let s = self.score(probs);
        match self {
            HardExampleRule::Confidence { threshold } | HardExampleRule::Margin { threshold } => s < *threshold,
            HardExampleRule::Entropy { threshold } => s > *threshold,
        }
    }
}

/// McNemar's exact test of two classifiers on the same rows: `b` rows only
/// the first got right, `c` only the second. Returns the two-sided p-value
/// (binomial, p = 1/2, over the `b + c` discordant rows).
pub fn mcnemar_exact(b: u64, c: u64) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // P(X ≤ k) for X ~ Binomial(n, 1/2), summed in log space.
    let ln_half_n = -(n as f64) * std::f64::consts::LN_2;
    let mut ln_choose = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_marks_unsure_rows_hard() {
        let sure = [0.95f32, 0.03, 0.02];
        let torn = [0.45f32, 0.44, 0.11];
        let flat = [0.34f32, 0.33, 0.33];
        for rule in [
            HardExampleRule::Confidence { threshold: 0.6 },
            HardExampleRule::Margin { threshold: 0.2 },
            HardExampleRule::Entropy { threshold: 0.5 },
        ] {
            rule.validate().unwrap();
            assert!(!rule.is_hard(&sure), "{rule:?}");
            assert!(rule.is_hard(&torn), "{rule:?}");
            assert!(rule.is_hard(&flat), "{rule:?}");
            assert!(rule.is_hard(&[f32::NAN, 0.5]), "{rule:?}");
        }
        // Entropy is normalised: a uniform answer scores 1 for any class count.
        let e = HardExampleRule::Entropy { threshold: 0.5 };
        assert!((e.score(&[0.5, 0.5]) - 1.0).abs() < 1e-9);
        assert!((e.score(&[0.1; 10]) - 1.0).abs() < 1e-6);
        assert!(e.score(&[1.0, 0.0]).abs() < 1e-12);
        // Margin of a two-class answer: |p1 - p0|.
        let m = HardExampleRule::Margin { threshold: 0.5 };
        assert!((m.score(&[0.2, 0.8]) - 0.6).abs() < 1e-6);
    }

    #[test]
    fn thresholds_are_checked_and_named() {
        for bad in [
            HardExampleRule::Confidence { threshold: 0.0 },
            HardExampleRule::Margin { threshold: 1.5 },
            HardExampleRule::Entropy { threshold: 1.0 },
            HardExampleRule::Confidence { threshold: f64::NAN },
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.starts_with("threshold:") && e.contains(bad.name()), "{e}");
        }
        let parsed: HardExampleRule = toml::from_str("rule = \"margin\"\nthreshold = 0.2\n").unwrap();
        assert_eq!(parsed, HardExampleRule::Margin { threshold: 0.2 });
        assert!(toml::from_str::<HardExampleRule>("rule = \"vibes\"\nthreshold = 0.2\n").is_err());
    }

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // Reference values: scipy.stats.binomtest(k, n, 0.5).pvalue.
        assert!((mcnemar_exact(0, 0) - 1.0).abs() < 1e-12);
        assert!((mcnemar_exact(5, 5) - 1.0).abs() < 1e-12);
        assert!((mcnemar_exact(1, 9) - 0.021484375).abs() < 1e-12);
        assert!((mcnemar_exact(10, 2) - 0.03857421875).abs() < 1e-12);
        assert!((mcnemar_exact(3, 4) - 1.0).abs() < 1e-12);
        // Large counts stay finite and symmetric.
        let p = mcnemar_exact(480, 520);
        assert!((p - mcnemar_exact(520, 480)).abs() < 1e-12 && p > 0.2 && p < 0.25, "{p}");
    }
}
