//! Randomness for the HE layer, drawn from TFHE-rs's CSPRNG (AES-128-CTR with
//! AES-NI): secret values from a generator seeded by the operating system,
//! public ones (the common random polynomial, hash coefficients) from its XOF
//! mode so every party derives the same values from the same transcript.

use rand_core::{OsRng, RngCore};
use tfhe::core_crypto::commons::ciphertext_modulus::CiphertextModulus;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, RandomGenerator, Seed, XofSeed};

use super::ring::{N, Poly, Q, from_signed};

/// Standard deviation of fresh RLWE errors (HE Standard, σ = 3.2).
pub const SIGMA: f64 = 3.2;

/// A cryptographic generator. Secret ones come from [`Csprng::from_os`]; public,
/// reproducible ones from [`Csprng::from_transcript`].
pub struct Csprng(RandomGenerator<DefaultRandomGenerator>);

impl Csprng {
    /// Seeded with 128 bits from the operating system: for secrets, masks, noise.
    pub fn from_os() -> Csprng {
        let mut seed = [0u8; 16];
        OsRng.fill_bytes(&mut seed);
        let g = RandomGenerator::new(Seed(u128::from_le_bytes(seed)));
        zeroize::Zeroize::zeroize(&mut seed);
        Csprng(g)
    }

    /// The XOF of a public transcript under an 8-byte domain separator: every
    /// party that hashes the same transcript gets the same stream.
    pub fn from_transcript(transcript: &[u8], domain: [u8; 8]) -> Csprng {
        Csprng(RandomGenerator::new(XofSeed::new(blake3::hash(transcript).as_bytes().to_vec(), domain)))
    }

    /// A deterministic generator for known-answer tests only.
    #[cfg(test)]
    pub(crate) fn for_tests(seed: u128) -> Csprng {
        Csprng(RandomGenerator::new(Seed(seed)))
    }

    /// A polynomial uniform in `[0, Q)^N` (rejection sampling, so exactly uniform).
    pub fn uniform(&mut self) -> Poly {
        let mut p = vec![0u64; N];
        self.fill_uniform(&mut p);
        p
    }

    /// Fills `out` with values uniform in `[0, Q)`.
    pub fn fill_uniform(&mut self, out: &mut [u64]) {
        // Q < 2^62 is a valid custom modulus; the unwrap-free form keeps clippy quiet.
        match CiphertextModulus::<u64>::try_new(Q as u128) {
            Ok(m) => self.0.fill_slice_with_random_uniform_custom_mod(out, m),
            Err(_) => unreachable!("Q is a valid modulus (tested)"),
        }
    }

    /// A polynomial with coefficients uniform in {−1, 0, 1}.
    pub fn ternary(&mut self) -> Poly {
        (0..N)
            .map(|_| match self.0.random_uniform_ternary::<u64>() {
                0 => 0,
                1 => 1,
                _ => Q - 1,
            })
            .collect()
    }

    /// Adds rounded Gaussian noise of standard deviation `sigma` to `p` (mod Q).
    pub fn add_gaussian(&mut self, p: &mut [u64], sigma: f64) {
        let mut chunks = p.chunks_exact_mut(2);
        for pair in &mut chunks {
            let (a, b): (f64, f64) = self.0.random_gaussian(0.0, sigma);
            pair[0] = super::ring::add_mod(pair[0], from_signed(a.round() as i64));
            pair[1] = super::ring::add_mod(pair[1], from_signed(b.round() as i64));
        }
        for v in chunks.into_remainder() {
            let (a, _): (f64, f64) = self.0.random_gaussian(0.0, sigma);
            *v = super::ring::add_mod(*v, from_signed(a.round() as i64));
        }
    }

    /// A polynomial of rounded Gaussian noise.
    pub fn gaussian(&mut self, sigma: f64) -> Poly {
        let mut p = vec![0u64; N];
        self.add_gaussian(&mut p, sigma);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::super::ring::centred;
    use super::*;

    #[test]
    fn ternary_is_balanced() {
        let mut g = Csprng::for_tests(1);
        let mut counts = [0usize; 3];
        for _ in 0..8 {
            for v in g.ternary() {
                match centred(v) {
                    -1 => counts[0] += 1,
                    0 => counts[1] += 1,
                    1 => counts[2] += 1,
                    other => panic!("ternary value {other}"),
                }
            }
        }
        // 32768 draws, expected 10923 each; χ² with 2 d.o.f. below 13.8 (p = 0.001).
        let e = 8.0 * N as f64 / 3.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi2 < 13.8, "{counts:?}");
    }

    #[test]
    fn gaussian_has_its_sigma_and_signs_map_mod_q() {
        let mut g = Csprng::for_tests(2);
        let p = g.gaussian(1000.0);
        let vals: Vec<f64> = p.iter().map(|&v| centred(v) as f64).collect();
        let mean = vals.iter().sum::<f64>() / N as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / N as f64;
        // 4096 samples: the sample std is within 5% of σ with overwhelming probability.
        assert!((var.sqrt() / 1000.0 - 1.0).abs() < 0.05, "std {}", var.sqrt());
        assert!(vals.iter().any(|&v| v < 0.0) && vals.iter().all(|v| v.abs() < 8000.0));
    }

    #[test]
    fn uniform_is_below_q_and_transcripts_are_reproducible() {
        let a = Csprng::from_transcript(b"job 1 round 2", *b"CnfdTest").uniform();
        let b = Csprng::from_transcript(b"job 1 round 2", *b"CnfdTest").uniform();
        let c = Csprng::from_transcript(b"job 1 round 3", *b"CnfdTest").uniform();
        let d = Csprng::from_transcript(b"job 1 round 2", *b"CnfdOthr").uniform();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!(a.iter().all(|&v| v < Q));
        // Top bits used: values reach the upper half of [0, Q).
        assert!(a.iter().any(|&v| v > Q / 2));
        assert_ne!(Csprng::from_os().uniform(), Csprng::from_os().uniform());
    }
}
