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

use super::ring::{Q, add_mod};
use super::sample::PublicStream;

/// Functionals per hash.
pub const RHO: usize = 3;

/// Coefficients hashed per block (the coefficient buffers stay in L1/L2).
const BLOCK: usize = 2048;

/// `x mod Q` for any `x < 2^128`, using Q = 2^62 − 2^16 + 1: 2^62 ≡ 2^16 − 1,
/// so two folds and one conditional subtraction (no 128-bit division).
#[inline]
pub(crate) fn reduce128(x: u128) -> u64 {
    const MASK: u64 = (1 << 62) - 1;
    const FOLD: u128 = (1 << 16) - 1;
    let y = (x >> 62) * FOLD + (x as u64 & MASK) as u128; // < 2^82 + 2^62
    let z = ((y >> 62) as u64) * FOLD as u64 + (y as u64 & MASK); // < 2^36 + 2^62 < 2Q
    if z >= Q { z - Q } else { z }
}

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
    /// coefficient: c0's integer sums and c1's values mod q). One pass over
    /// the data for all ρ functionals, each drawn from its own public stream.
    pub fn hash(&self, parts: &[&[u64]]) -> [u64; RHO] {
        let mut streams: [PublicStream; RHO] = std::array::from_fn(|l| {
            let mut domain = *b"CnfdHEh0";
            domain[7] = b'0' + l as u8;
            PublicStream::new(&self.transcript, domain)
        });
        let mut r = [[0u64; BLOCK]; RHO];
        let mut c = [0u64; BLOCK];
        let mut out = [0u64; RHO];
        for part in parts {
            for chunk in part.chunks(BLOCK) {
                let n = chunk.len();
                for (d, &v) in c.iter_mut().zip(chunk) {
                    *d = if v >= Q { reduce128(v as u128) } else { v };
                }
                for ((stream, r), o) in streams.iter_mut().zip(r.iter_mut()).zip(out.iter_mut()) {
                    stream.fill_uniform(&mut r[..n]);
                    // Products are < 2^124; eight fit a u128 before reducing.
                    for (rs, cs) in r[..n].chunks(8).zip(c[..n].chunks(8)) {
                        let s: u128 = rs.iter().zip(cs).map(|(&a, &b)| a as u128 * b as u128).sum();
                        *o = add_mod(*o, reduce128(s));
                    }
                }
            }
        }
        out
    }
}

/// Sums hash values mod q (the expected hash of a sum).
pub fn sum_hashes<'a>(hashes: impl IntoIterator<Item = &'a [u64; RHO]>) -> [u64; RHO] {
    let mut out = [0u64; RHO];
    for h in hashes {
        for (o, &v) in out.iter_mut().zip(h) {
            *o = add_mod(*o, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn reduce128_is_the_remainder(hi in any::<u64>(), lo in any::<u64>()) {
            let x = ((hi as u128) << 64) | lo as u128;
            prop_assert_eq!(reduce128(x), (x % Q as u128) as u64);
        }
    }

    #[test]
    fn reduce128_edges() {
        for x in [0u128, 1, Q as u128 - 1, Q as u128, 2 * Q as u128 - 1, 2 * Q as u128, u64::MAX as u128, u128::MAX] {
            assert_eq!(reduce128(x), (x % Q as u128) as u64, "{x}");
        }
    }

    #[test]
    fn public_stream_is_uniform_below_q_and_reproducible() {
        let mut a = PublicStream::new(b"t", *b"CnfdHEh0");
        let mut b = PublicStream::new(b"t", *b"CnfdHEh0");
        let mut c = PublicStream::new(b"t", *b"CnfdHEh1");
        let (mut x, mut y, mut z) = (vec![0u64; 5000], vec![0u64; 5000], vec![0u64; 5000]);
        a.fill_uniform(&mut x);
        b.fill_uniform(&mut y);
        c.fill_uniform(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
        assert!(x.iter().all(|&v| v < Q));
        // Each of the top 4 bits of a 62-bit value is set about half the time.
        for bit in 58..62 {
            let ones = x.iter().filter(|&&v| v >> bit & 1 == 1).count();
            assert!((2250..2750).contains(&ones), "bit {bit}: {ones}");
        }
    }
}
