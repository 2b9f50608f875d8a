//! A linear hash over Z_q of ciphertext vectors: H_r(c) = Σ_ℓ r_ℓ·c_ℓ mod q
//! with ρ = 3 independent random functionals over every coefficient.
//!
//! Linear, so the hash of a sum is the sum of the hashes: a decryptor checks
//! that the aggregate it is asked to decrypt is the sum of the round's signed
//! ciphertexts without downloading them, by comparing H_r(aggregate) with the
//! sum of the values each contributor signed for its own ciphertext. The
//! coefficients r are derived from a transcript that includes the
//! coordinator's commitment to the aggregate, so they are fixed only after
//! the aggregate is. Soundness: for a fixed aggregate different from the true
//! sum, each functional collides with probability 1/q (a nonzero linear form
//! vanishes on a 1/q fraction of uniform r), so 2^−186 for ρ = 3, which also
//! leaves room for a coordinator that grinds its commitment.

use super::ring::{N, Q};
use super::sample::Csprng;

/// Functionals per hash.
pub const RHO: usize = 3;

/// The hash's coefficients, regenerated block by block from the transcript.
pub struct LinearHash {
    transcript: Vec<u8>,
}

impl LinearHash {
    /// The hash keyed by `transcript` (which must bind the job, round and the
    /// coordinator's commitment to the aggregate).
    pub fn new(transcript: &[u8]) -> LinearHash {
        LinearHash { transcript: transcript.to_vec() }
    }

    /// Hashes the concatenation of `parts` (each reduced mod q coefficient by
    /// coefficient: c0's integer sums and c1's values mod q).
    pub fn hash(&self, parts: &[&[u64]]) -> [u64; RHO] {
        let mut out = [0u64; RHO];
        for (l, o) in out.iter_mut().enumerate() {
            let mut domain = *b"CnfdHEh0";
            domain[7] = b'0' + l as u8;
            let mut rng = Csprng::from_transcript(&self.transcript, domain);
            let mut r = vec![0u64; N];
            let mut acc: u64 = 0;
            for part in parts {
                for chunk in part.chunks(N) {
                    rng.fill_uniform(&mut r[..chunk.len()]);
                    // Products are < 2^124; eight fit a u128 before reducing.
                    for (rs, cs) in r[..chunk.len()].chunks(8).zip(chunk.chunks(8)) {
                        let mut s: u128 = 0;
                        for (&a, &c) in rs.iter().zip(cs) {
                            s += a as u128 * (c % Q) as u128;
                        }
                        acc = super::ring::add_mod(acc, (s % Q as u128) as u64);
                    }
                }
            }
            *o = acc;
        }
        out
    }
}

/// Sums hash values mod q (the expected hash of a sum).
pub fn sum_hashes<'a>(hashes: impl IntoIterator<Item = &'a [u64; RHO]>) -> [u64; RHO] {
    let mut out = [0u64; RHO];
    for h in hashes {
        for (o, &v) in out.iter_mut().zip(h) {
            *o = super::ring::add_mod(*o, v);
        }
    }
    out
}
