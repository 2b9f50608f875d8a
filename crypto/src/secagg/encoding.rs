//! Fixed-point encoding of real vectors into Z_{2^bits} for secure summation.
//!
//! Each value is clipped to `[-clip, clip]` and mapped to an integer level in
//! `0..=levels`, with `levels = ⌊(2^(bits − reserve_bits) − 1) / max_parties⌋`,
//! so the sum of `max_parties` encodings never wraps. `reserve_bits` keeps
//! headroom for distributed discrete-Gaussian DP noise added before masking.

use crate::Error;

/// The encoding parameters every party and the coordinator agree on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    bits: u32,
    clip: f32,
    max_parties: usize,
    levels: u64,
}

impl FixedPoint {
    /// Validates the parameters; fails when `bits` leaves fewer than 2^8
    /// levels per party.
    pub fn new(bits: u32, reserve_bits: u32, clip: f32, max_parties: usize) -> Result<FixedPoint, Error> {
        if !(8..=32).contains(&bits) || reserve_bits >= bits {
            return Err(Error::InvalidInput(format!("bits {bits} with {reserve_bits} reserved: need 8..=32 bits")));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(Error::InvalidInput(format!("clip must be positive and finite (got {clip})")));
        }
        if max_parties == 0 {
            return Err(Error::InvalidInput("max_parties must be positive".into()));
        }
        let levels = ((1u64 << (bits - reserve_bits)) - 1) / max_parties as u64;
        if levels < 256 {
            return Err(Error::InvalidInput(format!(
                "{bits} bits leave only {levels} levels per party for {max_parties} parties; raise bits"
            )));
        }
        Ok(FixedPoint { bits, clip, max_parties, levels })
    }

    /// Bits of the modulus.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Integer levels per value and party.
    pub fn levels(&self) -> u64 {
        self.levels
    }

    /// Largest absolute error per value of a decoded sum of `n` encodings
    /// (half a quantisation step per party), ignoring clipping.
    pub fn max_error(&self, n: usize) -> f64 {
        n as f64 * f64::from(self.clip) / self.levels as f64
    }

    /// Encodes values (NaN is rejected by the caller's finiteness checks and
    /// maps to the midpoint here).
    pub fn encode(&self, values: &[f32]) -> Vec<u32> {
        let mut out = Vec::with_capacity(values.len());
        self.encode_into(values.iter().copied(), &mut out);
        out
    }

    /// Appends the encodings of `values` to `out`: one pass and no temporary
    /// vector, so a party can encode `n/N · (local − global)` straight into
    /// the buffer it then masks in place (leave room for extra words, such as
    /// the example count, in `out`'s capacity).
    pub fn encode_into(&self, values: impl Iterator<Item = f32>, out: &mut Vec<u32>) {
        // f64 throughout: levels reach 2^32 / n, beyond f32's 24-bit mantissa.
        let c = f64::from(self.clip);
        let scale = self.levels as f64 / (2.0 * c);
        // After clamping, x = (v + c)·scale lies in [0, levels] ⊂ [0, 2^32).
        // Adding 2^52 leaves round-to-nearest(x) in the low mantissa bits
        // (ties to even), and the result never exceeds `levels`. Unlike a
        // float-to-int cast, this is plain arithmetic and vectorises.
        const ROUND: f64 = (1u64 << 52) as f64;
        out.extend(values.map(|v| {
            let v = if v.is_nan() { 0.0 } else { f64::from(v).clamp(-c, c) };
            ((v + c) * scale + ROUND).to_bits() as u32
        }));
    }

    /// Encodes `scale · (local − global)` element-wise into `out` (the same
    /// levels as [`FixedPoint::encode_into`]); returns whether a local value
    /// was NaN or infinite. One branch-free pass over plain slices, which
    /// the compiler vectorises: the hot loop of every secure round.
    pub fn encode_scaled_delta(&self, local: &[f32], global: &[f32], weight: f32, out: &mut [u32]) -> bool {
        /// The loop, compiled for the CPU's widest vector instructions
        /// (AVX2 or AVX-512, detected at run time by `pulp`; its `with_simd`
        /// and everything it calls are inlined into pulp's target-feature
        /// function). The same operations in the same order: the same bits.
        struct ScaledDelta<'a>(&'a FixedPoint, &'a [f32], &'a [f32], f32, &'a mut [u32]);
        impl pulp::WithSimd for ScaledDelta<'_> {
            type Output = bool;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, _: S) -> bool {
                let ScaledDelta(fixed, local, global, weight, out) = self;
                fixed.encode_scaled_delta_inline(local, global, weight, out)
            }
        }
        pulp::Arch::new().dispatch(ScaledDelta(self, local, global, weight, out))
    }

    #[inline(always)]
    fn encode_scaled_delta_inline(&self, local: &[f32], global: &[f32], weight: f32, out: &mut [u32]) -> bool {
        let c = f64::from(self.clip);
        let scale = self.levels as f64 / (2.0 * c);
        const ROUND: f64 = (1u64 << 52) as f64;
        const EXPONENT: u32 = 0x7f80_0000;
        let mut non_finite = 0u32;
        for ((o, &l), &g) in out.iter_mut().zip(local).zip(global) {
            non_finite |= u32::from(l.to_bits() & EXPONENT == EXPONENT);
            let v = f64::from((l - g) * weight);
            // A select, not a branch: NaN maps to the midpoint; max/min clamp.
            let v = if v.is_nan() { 0.0 } else { v.max(-c).min(c) };
            *o = ((v + c) * scale + ROUND).to_bits() as u32;
        }
        non_finite != 0
    }

    /// Decodes the sum of `contributors` encodings.
    pub fn decode_sum(&self, sum: &[u32], contributors: usize) -> Result<Vec<f64>, Error> {
        self.decode_sum_scaled(sum, contributors, 1.0)
    }

    /// [`FixedPoint::decode_sum`] times `scale`, in one pass.
    pub fn decode_sum_scaled(&self, sum: &[u32], contributors: usize, scale: f64) -> Result<Vec<f64>, Error> {
        if contributors == 0 || contributors > self.max_parties {
            return Err(Error::InvalidInput(format!("{contributors} contributors for at most {}", self.max_parties)));
        }
        let c = f64::from(self.clip);
        let step = 2.0 * c / self.levels as f64;
        let offset = contributors as f64 * c;
        Ok(sum.iter().map(|&s| (f64::from(s) * step - offset) * scale).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_parameters() {
        assert!(FixedPoint::new(7, 0, 1.0, 1).is_err());
        assert!(FixedPoint::new(16, 0, 1.0, 1000).is_err());
        assert!(FixedPoint::new(32, 0, 0.0, 10).is_err());
        assert!(FixedPoint::new(32, 32, 1.0, 10).is_err());
    }

    #[test]
    fn encodes_to_the_nearest_level_and_saturates_at_the_clip() {
        let fp = FixedPoint::new(16, 0, 1.0, 1).unwrap();
        let top = fp.levels() as u32;
        assert_eq!(fp.encode(&[-1.0, 1.0, -5.0, 5.0, f32::INFINITY, f32::NEG_INFINITY]), [0, top, 0, top, top, 0]);
        // Midpoint: (0 + 1) · levels / 2 = 32767.5 rounds to even.
        assert_eq!(fp.encode(&[0.0, f32::NAN]), [32768, 32768]);
        let step = 2.0 / fp.levels() as f32;
        assert_eq!(fp.encode(&[-1.0 + 2.4 * step, -1.0 + 2.6 * step]), [2, 3]);
        let mut out = vec![7];
        fp.encode_into([1.0f32].into_iter(), &mut out);
        assert_eq!(out, [7, top]);
    }

    proptest! {
        #[test]
        fn sums_decode_within_the_bound_and_never_wrap(
            vals in proptest::collection::vec(proptest::collection::vec(-3.0f32..3.0, 5), 1..20),
            reserve in 0u32..8,
        ) {
            let n = vals.len();
            let fp = FixedPoint::new(32, reserve, 2.0, 20).unwrap();
            let mut sum = [0u64; 5];
            for v in &vals {
                for (s, q) in sum.iter_mut().zip(fp.encode(v)) { *s += u64::from(q); }
            }
            prop_assert!(sum.iter().all(|&s| s < 1 << (32 - reserve)));
            let sum32: Vec<u32> = sum.iter().map(|&s| s as u32).collect();
            let dec = fp.decode_sum(&sum32, n).unwrap();
            for j in 0..5 {
                let exact: f64 = vals.iter().map(|v| f64::from(v[j].clamp(-2.0, 2.0))).sum();
                prop_assert!((dec[j] - exact).abs() <= fp.max_error(n) + 1e-9, "{} vs {}", dec[j], exact);
            }
        }
    }
}
