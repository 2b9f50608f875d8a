//! A linear hash over Z_q of ciphertext vectors: H_r(c) = Σ_ℓ r_ℓ·c_ℓ mod q
//! with ρ = 3 independent random functionals over every coefficient.
//!
//! Linear, so the hash of a sum is the sum of the hashes: a decryptor checks
//! that the aggregate it is asked to decrypt is the sum of the round's signed
//! ciphertexts without downloading them, by comparing H_r(aggregate) with the
//! sum of the values each contributor signed for its own ciphertext. The
//! coefficients r are derived from a transcript that includes the
//! coordinator's commitment to the aggregate, so they are fixed only after
//! the aggregate is.
//!
//! Each functional's coefficients are a rank-one matrix: coefficient ℓ, in
//! row i = ⌊ℓ/N⌋ and column j = ℓ mod N, is r_ℓ = α_j·β_i with α ∈ Z_q^N and
//! β (one value per row) uniform from the transcript. So a hash needs N plus
//! one value per N coefficients from the stream, not one per coefficient
//! (which cost more than the products). Soundness: for a fixed aggregate
//! different from the true sum, the difference D (laid out in rows of N) is
//! nonzero and αᵀ·D·β is a nonzero polynomial of total degree 2 in the
//! uniform α, β, so it vanishes with probability at most 2/q
//! (Schwartz–Zippel): about 2^−183 for ρ = 3, which also leaves room for a
//! coordinator that grinds its commitment.

use super::ring::{N, Q, add_mod};
use super::sample::AesStream;

/// Functionals per hash.
pub const RHO: usize = 3;

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

/// The hash keyed by a transcript: its column factors α, and the streams
/// its row factors β come from.
pub struct LinearHash {
    transcript: Vec<u8>,
}

impl LinearHash {
    /// The hash keyed by `transcript` (which must bind the job, round and the
    /// coordinator's commitment to the aggregate).
    pub fn new(transcript: &[u8]) -> LinearHash {
        LinearHash { transcript: transcript.to_vec() }
    }

    fn stream(&self, kind: u8, functional: usize) -> AesStream {
        let mut domain = *b"CnfdHEa0";
        domain[6] = kind;
        domain[7] = b'0' + functional as u8;
        AesStream::public(&self.transcript, domain)
    }

    /// Hashes the concatenation of `parts` (each reduced mod q coefficient by
    /// coefficient: c0's integer sums and c1's values mod q). One pass over
    /// the data for all ρ functionals.
    pub fn hash(&self, parts: &[&[u64]]) -> [u64; RHO] {
        let mut alpha = vec![0u64; RHO * N];
        for (l, a) in alpha.chunks_exact_mut(N).enumerate() {
            self.stream(b'a', l).fill_uniform(a);
        }
        let mut rows: [AesStream; RHO] = std::array::from_fn(|l| self.stream(b'b', l));
        let mut out = [0u64; RHO];
        // Σ_j α_j·c_{i,j} of the current row i, and the row's next column.
        let mut row = [0u64; RHO];
        let mut col = 0;
        let mut finish_row = |row: &mut [u64; RHO], out: &mut [u64; RHO]| {
            for ((o, r), stream) in out.iter_mut().zip(row.iter_mut()).zip(rows.iter_mut()) {
                let beta = stream.next_uniform();
                *o = add_mod(*o, reduce128(*r as u128 * beta as u128));
                *r = 0;
            }
        };
        for part in parts {
            let mut rest = *part;
            while !rest.is_empty() {
                let take = (N - col).min(rest.len());
                let (now, later) = rest.split_at(take);
                let a: [&[u64]; RHO] = std::array::from_fn(|l| &alpha[l * N + col..l * N + col + take]);
                // Products are < 2^124; eight fit a u128 before reducing.
                for (at, c) in (0..take).step_by(8).zip(now.chunks(8)) {
                    let mut sums = [0u128; RHO];
                    for (i, &v) in c.iter().enumerate() {
                        let v = if v >= Q { reduce128(v as u128) } else { v } as u128;
                        for (sum, a) in sums.iter_mut().zip(&a) {
                            *sum += a[at + i] as u128 * v;
                        }
                    }
                    for (r, sum) in row.iter_mut().zip(sums) {
                        *r = add_mod(*r, reduce128(sum));
                    }
                }
                col += take;
                rest = later;
                if col == N {
                    finish_row(&mut row, &mut out);
                    col = 0;
                }
            }
        }
        if col > 0 {
            finish_row(&mut row, &mut out);
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

    /// The hash is Σ_ℓ α_{ℓ mod N}·β_{⌊ℓ/N⌋}·c_ℓ mod q over the parts'
    /// concatenation, whatever the parts' boundaries (here inside rows), with
    /// values at or above q reduced; α and β are the transcript's streams.
    #[test]
    fn hash_is_the_rank_one_functional_over_the_concatenation() {
        use super::super::ring::mul_mod;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        let mut a: Vec<u64> = (0..N + 1000).map(|_| rng.random_range(0..Q)).collect();
        let b: Vec<u64> = (0..2 * N + 17).map(|_| rng.random::<u64>()).collect();
        a[3] = u64::MAX; // c0's integer sums can exceed q
        let h = LinearHash::new(b"transcript");
        let got = h.hash(&[&a, &b]);
        let all: Vec<u64> = a.iter().chain(&b).map(|&v| v % Q).collect();
        for (l, &g) in got.iter().enumerate() {
            let mut alpha = vec![0u64; N];
            h.stream(b'a', l).fill_uniform(&mut alpha);
            let mut rows = h.stream(b'b', l);
            let mut want = 0u64;
            for row in all.chunks(N) {
                let beta = rows.next_uniform();
                for (j, &c) in row.iter().enumerate() {
                    want = add_mod(want, mul_mod(mul_mod(alpha[j], beta), c));
                }
            }
            assert_eq!(g, want, "functional {l}");
        }
        // Another split of the same values hashes the same.
        let joined: Vec<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(h.hash(&[&joined]), got);
        assert_eq!(h.hash(&[&joined[..7], &joined[7..N + 9], &joined[N + 9..]]), got);
    }

    /// Pinned values: a change to the streams' keys or domains, or to the
    /// layout, changes every party's hash (parties of two versions would
    /// not agree), so it must be deliberate.
    #[test]
    fn known_answer() {
        let values: Vec<u64> = (0..N as u64 + 5).map(|i| i * 0x9E37_79B9 % Q).collect();
        let got = LinearHash::new(b"confide he linear hash known answer").hash(&[&values]);
        assert_eq!(got, [2335542655646605189, 1387891481213312121, 3090815193199439788]);
    }

    proptest! {
        /// Changing any one coefficient, by any nonzero amount mod q, changes
        /// every functional (a sanity check of the layout: for a single
        /// coefficient it only needs the α_j and β_i involved to be nonzero).
        #[test]
        fn any_single_change_changes_the_hash(at in 0usize..3 * N, delta in 1..Q) {
            let base: Vec<u64> = (0..3 * N as u64).map(|i| i * 7919 % Q).collect();
            let mut changed = base.clone();
            changed[at] = add_mod(changed[at], delta);
            let h = LinearHash::new(b"t");
            let (x, y) = (h.hash(&[&base]), h.hash(&[&changed]));
            prop_assert!(x.iter().zip(&y).all(|(a, b)| a != b));
        }
    }

    #[test]
    fn public_stream_is_uniform_below_q_and_reproducible() {
        let mut a = AesStream::public(b"t", *b"CnfdHEh0");
        let mut b = AesStream::public(b"t", *b"CnfdHEh0");
        let mut c = AesStream::public(b"t", *b"CnfdHEh1");
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
