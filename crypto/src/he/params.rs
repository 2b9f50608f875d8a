//! Parameters of threshold-RLWE aggregation and the noise arithmetic that
//! justifies them (`docs/homomorphic-aggregation.md` has the argument).
//!
//! Everything here is a pure function of the job's public facts (party count,
//! threshold, plaintext bits, key budget), so each party recomputes it from the
//! spec it accepted instead of trusting the wire.

use super::ring::{N, Q};
use super::sample::SIGMA;
use crate::Error;

/// Gaussian tail factor for the decoding bounds: P(|X| > 8.93σ) < 2^−61 per
/// coefficient, so below 2^−40 for a round of 10^6 coefficients.
pub const TAIL: f64 = 8.93;

/// Shamir x-coordinate of the party at `index` (0-based, parties sorted by
/// name): 1, −1, 3, −3, 5, … Odd, so every product of points is invertible mod
/// 2^b, and centred, so the erasure weights (differences of points) stay small.
pub fn point(index: usize) -> i64 {
    let m = 2 * (index / 2) as i64 + 1;
    if index.is_multiple_of(2) { m } else { -m }
}

/// The public parameters of one key epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct HeParams {
    /// Parties holding key shares (the job's fixed party set).
    pub key_parties: usize,
    /// Shares needed to decrypt (Shamir threshold τ).
    pub threshold: usize,
    /// Plaintext bits b: sums are exact modulo 2^b.
    pub bits: u32,
    /// Bits k of the switched modulus 2^k that c0 and decryption shares travel in.
    pub switch_bits: u32,
    /// Standard deviation of each decryptor's flooding noise.
    pub flood_sigma: f64,
    /// Coefficients each key share may help decrypt before the key must be
    /// replaced (the Rényi-divergence budget).
    pub key_budget: u64,
    /// Surplus decryptors beyond τ the parameters are sized for (erasures,
    /// detection, leaving a suspected share out).
    pub surplus: usize,
}

/// Largest plaintext width this layer accepts (values are `u32`).
pub const MAX_BITS: u32 = 32;

impl HeParams {
    /// Parameters for `key_parties` parties with threshold `threshold`, b-bit
    /// plaintexts, a key budget of 2^`budget_log2` decrypted coefficients and
    /// `surplus` decryptors beyond τ. Refuses combinations whose worst-case
    /// decoding bound leaves no room for b bits, naming the limit.
    pub fn new(
        key_parties: usize,
        threshold: usize,
        bits: u32,
        budget_log2: u32,
        surplus: usize,
    ) -> Result<HeParams, Error> {
        if key_parties < 2 || threshold < 2 || threshold > key_parties {
            return Err(Error::InvalidInput(format!(
                "he: threshold {threshold} must be within 2..={key_parties} (the key's party count)"
            )));
        }
        if !(1..=MAX_BITS).contains(&bits) {
            return Err(Error::InvalidInput(format!("he: bits = {bits} must be within 1..={MAX_BITS}")));
        }
        if !(10..=40).contains(&budget_log2) {
            return Err(Error::InvalidInput(format!("he: key budget 2^{budget_log2} must be within 2^10..=2^40")));
        }
        let surplus = surplus.min(key_parties - threshold);
        let flood_sigma = flood_sigma(key_parties, 1u64 << budget_log2);
        let mut p = HeParams {
            key_parties,
            threshold,
            bits,
            switch_bits: 62,
            flood_sigma,
            key_budget: 1u64 << budget_log2,
            surplus,
        };
        let max_bits = p.max_bits();
        if bits > max_bits {
            return Err(Error::InvalidInput(format!(
                "he: bits = {bits} leaves no room for the decryption noise of {key_parties} parties with {surplus} \
                 surplus decryptors and a key budget of 2^{budget_log2}; at most {max_bits} bits fit"
            )));
        }
        p.switch_bits = p.min_switch_bits();
        Ok(p)
    }

    /// Standard deviation of the aggregate's encryption noise V for `contributors` ciphertexts.
    pub fn aggregate_sigma(&self, contributors: usize) -> f64 {
        aggregate_sigma(self.key_parties, contributors)
    }

    /// The worst-case decoding bound, at scale q, of a combination that erases
    /// `erased` of the decryption set (largest points, all parties contributing).
    fn worst_bound_q(&self) -> (f64, f64) {
        let xmax = point(self.key_parties - 1).unsigned_abs() as f64;
        let e = self.surplus as i32;
        let x = xmax.powi(e);
        let w = (2.0 * xmax).powi(e);
        let shares = (self.threshold + self.surplus) as f64;
        let sigma_v = self.aggregate_sigma(self.key_parties);
        let sigma = (x * x * sigma_v * sigma_v + shares * w * w * self.flood_sigma * self.flood_sigma).sqrt();
        // Detection compares a combination with one that erases one more share,
        // whose weights grow by |x_z − x_b| ≤ 2·xmax: the bounds carry that factor
        // so a bad share cannot reach the next plaintext point unseen.
        let detect = 2.0 * xmax + 1.0;
        let bound_q = (TAIL * sigma + x) * detect;
        let rounding = (0.5 * (x * self.key_parties as f64 + shares * w) + 1.0) * detect;
        (bound_q, rounding)
    }

    /// The largest b for which every combination of τ..=τ+surplus shares decodes exactly.
    pub fn max_bits(&self) -> u32 {
        let (bound_q, _) = self.worst_bound_q();
        // Need bound_q < Q / 2^(b+2).
        let room = (Q as f64 / bound_q).log2().floor() as i64 - 2;
        room.clamp(0, MAX_BITS as i64) as u32
    }

    fn min_switch_bits(&self) -> u32 {
        let (_, rounding) = self.worst_bound_q();
        // Need rounding < 2^(k−b−2).
        let k = self.bits + 2 + rounding.log2().ceil() as u32 + 1;
        k.min(62)
    }

    /// Shamir x-coordinates of the key's parties, in party order.
    pub fn points(&self) -> Vec<i64> {
        (0..self.key_parties).map(point).collect()
    }

    /// The decoding bound at scale 2^k of a combination with Lagrange scale `x`
    /// and erasure weights `weights`, for `contributors` ciphertexts. Decoding
    /// is exact (with probability ≥ 1 − 2^−61 per coefficient) while it is below
    /// 2^(k−b−1).
    pub fn decode_bound(&self, contributors: usize, x: i128, weights: &[i128]) -> f64 {
        let sigma_v = self.aggregate_sigma(contributors);
        let xf = x.unsigned_abs() as f64;
        let ws: f64 = weights.iter().map(|&w| (w as f64) * (w as f64)).sum();
        let sigma = (xf * xf * sigma_v * sigma_v + ws * self.flood_sigma * self.flood_sigma).sqrt();
        let scale = (1u128 << self.switch_bits) as f64 / Q as f64;
        let rounding =
            0.5 * (xf * contributors as f64 + weights.iter().map(|w| w.unsigned_abs() as f64).sum::<f64>()) + 1.0;
        scale * (TAIL * sigma + xf) + rounding
    }

    /// Bytes of one party's upload for `values` plaintext values: c0 at k bits
    /// and c1 at 62 bits per slot, whole blocks.
    pub fn ciphertext_bytes(&self, values: usize) -> usize {
        let blocks = values.div_ceil(N);
        blocks * (super::pack::packed_len(N, self.switch_bits) + super::pack::packed_len(N, 62))
    }
}

/// σ of the sum of `contributors` fresh encryptions under a key of `key_parties`:
/// each is e·u + e0 + e1·s (u ternary; e, s sums of `key_parties` errors and
/// ternary secrets), variance 2·(2/3)·N·n·σ² + σ².
pub fn aggregate_sigma(key_parties: usize, contributors: usize) -> f64 {
    let per = 2.0 * (2.0 / 3.0) * N as f64 * key_parties as f64 * SIGMA * SIGMA + SIGMA * SIGMA;
    (contributors as f64 * per).sqrt()
}

/// Flooding σ for a key budget of `budget` decrypted coefficients: Rényi
/// divergence of order 2 between flooded and ideal shares at most 2, i.e.
/// σ_f ≥ σ_V · √(1.1 · budget / ln 2) (Bai et al. 2018; Boudgoust–Scholl 2023),
/// with σ_V the noise of a sum over all key parties (1.1: χ² concentration of ‖V‖²).
pub fn flood_sigma(key_parties: usize, budget: u64) -> f64 {
    aggregate_sigma(key_parties, key_parties) * (1.1 * budget as f64 / std::f64::consts::LN_2).sqrt()
}

/// The threshold τ = ⌊(n + c)/2⌋ + 1 for n parties of which at most c are
/// corrupt: two disjoint decryption sets would need more honest parties than
/// exist, so one round's aggregate is decrypted at most once.
pub fn threshold_for(parties: usize, corrupt: usize) -> usize {
    ((parties + corrupt) / 2 + 1).min(parties)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_odd_centred_and_distinct() {
        let p: Vec<i64> = (0..6).map(point).collect();
        assert_eq!(p, vec![1, -1, 3, -3, 5, -5]);
    }

    #[test]
    fn noise_figures_match_the_design_note() {
        // n = 10: fresh ciphertext noise 2^9.5, sum of 10 ≈ 2^11.2.
        assert!((aggregate_sigma(10, 1).log2() - 9.55).abs() < 0.05);
        assert!((aggregate_sigma(10, 10).log2() - 11.2).abs() < 0.05);
        // Flood for 2^30 coefficients: σ_V · 2^15.33.
        let f = flood_sigma(10, 1 << 30) / aggregate_sigma(10, 10);
        assert!((f.log2() - 15.33).abs() < 0.01, "{}", f.log2());
    }

    #[test]
    fn parameters_for_ten_parties() {
        let p = HeParams::new(10, 6, 16, 26, 2).unwrap();
        assert!(p.max_bits() >= 16 && p.switch_bits > 16 && p.switch_bits <= 62);
        let too_many = HeParams::new(10, 6, p.max_bits() + 1, 26, 2).unwrap_err().to_string();
        assert!(too_many.contains("at most"), "{too_many}");
        assert!(HeParams::new(10, 11, 16, 26, 2).unwrap_err().to_string().contains("threshold"));
        assert!(HeParams::new(10, 6, 0, 26, 2).unwrap_err().to_string().contains("bits"));
        assert_eq!(threshold_for(10, 1), 6);
        assert_eq!(threshold_for(3, 0), 2);
    }
}
