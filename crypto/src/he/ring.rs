//! Arithmetic in R_q = Z_q\[X\]/(X^N + 1) with q = 2^62 − 2^16 + 1 (prime), on
//! `tfhe-ntt`'s 64-bit prime NTT.
//!
//! A prime modulus (not TFHE's 2^64) because Shamir-shared keys need
//! Lagrange coefficients, i.e. division, and because the NTT is exact for
//! products of two large polynomials where the f64 FFT is not.

use std::sync::OnceLock;

use tfhe_ntt::prime64::Plan;

/// Ring dimension: coefficients per ciphertext block.
pub const N: usize = 4096;
/// The computation modulus, prime, ≡ 1 mod 2^16 (so it has the 2N-th roots of
/// unity the negacyclic NTT needs) and below 2^62 (tfhe-ntt's fast path).
pub const Q: u64 = (1 << 62) - (1 << 16) + 1;

/// A polynomial of `N` coefficients in `[0, Q)`, in the coefficient domain
/// or the (bit-reversed) NTT domain, unnormalised (after [`ntt`]) or
/// normalised (after [`normalize`] or [`mul_ntt_assign`], as ciphertexts'
/// c1 travel); the type does not say which, the functions do.
pub type Poly = Vec<u64>;

fn plan() -> &'static Plan {
    static PLAN: OnceLock<Plan> = OnceLock::new();
    // Q and N are constants checked by a test (`plan_exists`); a failure here is
    // a build-time mistake, not an input error.
    #[allow(clippy::expect_used)]
    PLAN.get_or_init(|| Plan::try_new(N, Q).expect("Q is an NTT-friendly prime for N"))
}

/// The zero polynomial.
pub fn zero() -> Poly {
    vec![0; N]
}

/// Forward NTT in place (coefficients → NTT domain).
pub fn ntt(p: &mut [u64]) {
    plan().fwd(p);
}

/// Inverse NTT in place of a pointwise product formed by [`mul_ntt_assign`]
/// (which already divided by N).
pub fn intt(p: &mut [u64]) {
    plan().inv(p);
}

/// `lhs ⊙= rhs / N` in the NTT domain, so that `intt` afterwards yields the
/// ring product.
pub fn mul_ntt_assign(lhs: &mut [u64], rhs: &[u64]) {
    plan().mul_assign_normalize(lhs, rhs);
}

/// `p ⊙= 1/N` in the NTT domain: turns a forward transform into the
/// representation [`intt`] maps back to the polynomial itself (the one
/// [`mul_ntt_assign`] produces for products).
pub fn normalize(p: &mut [u64]) {
    plan().normalize(p);
}

/// The ring product of two coefficient-domain polynomials (three NTTs; tests
/// and key generation; hot paths keep operands in the NTT domain).
pub fn mul(a: &[u64], b: &[u64]) -> Poly {
    let mut x = a.to_vec();
    let mut y = b.to_vec();
    ntt(&mut x);
    ntt(&mut y);
    mul_ntt_assign(&mut x, &y);
    intt(&mut x);
    x
}

/// `a + b mod Q`.
#[inline]
pub fn add_mod(a: u64, b: u64) -> u64 {
    let s = a + b; // both < 2^62: no overflow
    if s >= Q { s - Q } else { s }
}

/// `a − b mod Q`.
#[inline]
pub fn sub_mod(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + Q - b }
}

/// `a · b mod Q`.
#[inline]
pub fn mul_mod(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) % Q as u128) as u64
}

/// `a^e mod Q`.
pub fn pow_mod(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1u64;
    while e > 0 {
        if e & 1 == 1 {
            r = mul_mod(r, a);
        }
        a = mul_mod(a, a);
        e >>= 1;
    }
    r
}

/// `a^{-1} mod Q` (Q is prime); `None` for 0.
pub fn inv_mod(a: u64) -> Option<u64> {
    (!a.is_multiple_of(Q)).then(|| pow_mod(a % Q, Q - 2))
}

/// A signed integer as an element of Z_Q.
#[inline]
pub fn from_signed(x: i64) -> u64 {
    let r = (x as i128).rem_euclid(Q as i128);
    r as u64
}

/// The centred representative of `x mod Q`, in (−Q/2, Q/2].
#[inline]
pub fn centred(x: u64) -> i64 {
    if x > Q / 2 { x as i64 - Q as i64 } else { x as i64 }
}

/// `acc += b` coefficient-wise mod Q.
pub fn add_assign(acc: &mut [u64], b: &[u64]) {
    for (a, &b) in acc.iter_mut().zip(b) {
        *a = add_mod(*a, b);
    }
}

/// `acc −= b` coefficient-wise mod Q.
pub fn sub_assign(acc: &mut [u64], b: &[u64]) {
    for (a, &b) in acc.iter_mut().zip(b) {
        *a = sub_mod(*a, b);
    }
}

/// `p · c` coefficient-wise mod Q.
pub fn scale_assign(p: &mut [u64], c: u64) {
    // Shoup's precomputed quotient: one high multiply instead of a 128-bit division.
    let c_shoup = (((c as u128) << 64) / Q as u128) as u64;
    for v in p.iter_mut() {
        let qhat = ((*v as u128 * c_shoup as u128) >> 64) as u64;
        let r = v.wrapping_mul(c).wrapping_sub(qhat.wrapping_mul(Q));
        *v = if r >= Q { r - Q } else { r };
    }
}

/// Switches `x ∈ [0, Q)` to the modulus 2^k: `⌊2^k · x / Q⌉ mod 2^k`.
#[inline]
pub fn switch_to_pow2(x: u64, k: u32) -> u64 {
    debug_assert!(x < Q && (1..=62).contains(&k));
    let num = ((x as u128) << k) + (Q as u128 / 2);
    // ⌊num / Q⌋ without a 128-bit division (run for every coefficient of
    // every upload and decryption share): with Q = 2^62 − δ, δ = 2^16 − 1,
    // A = ⌊num/2^62⌋ and B = ⌊A·δ/2^62⌋, q = A + B never exceeds the
    // quotient and num − q·Q = (num mod 2^62) + (A·δ mod 2^62) + B·δ is
    // below 2^63 + 2^33 < 3Q (A < 2^63, so B < 2^17): at most two
    // corrections. Unrolled: LLVM turns a correction loop into a call to
    // the 128-bit division it was meant to avoid.
    const DELTA: u128 = (1 << 16) - 1;
    let a = num >> 62;
    let mut q = (a + ((a * DELTA) >> 62)) as u64;
    let mut r = (num - q as u128 * Q as u128) as u64;
    let over = u64::from(r >= Q);
    q += over;
    r -= over * Q;
    q += u64::from(r >= Q);
    q & ((1u64 << k) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn switching_matches_the_128_bit_division(x in 0..Q, k in 1u32..=62) {
            let num = ((x as u128) << k) + (Q as u128 / 2);
            prop_assert_eq!(switch_to_pow2(x, k), ((num / Q as u128) as u64) & ((1u64 << k) - 1));
        }
    }

    #[test]
    fn switching_edges() {
        for k in [1u32, 20, 34, 36, 48, 62] {
            for x in [0, 1, Q / 2, Q / 2 + 1, Q - 2, Q - 1] {
                let num = ((x as u128) << k) + (Q as u128 / 2);
                assert_eq!(switch_to_pow2(x, k), ((num / Q as u128) as u64) & ((1u64 << k) - 1), "{x} {k}");
            }
        }
    }

    fn schoolbook(a: &[u64], b: &[u64]) -> Poly {
        let mut out = vec![0u64; N];
        for (i, &x) in a.iter().enumerate() {
            if x == 0 {
                continue;
            }
            for (j, &y) in b.iter().enumerate() {
                let p = mul_mod(x, y);
                let k = i + j;
                if k < N { out[k] = add_mod(out[k], p) } else { out[k - N] = sub_mod(out[k - N], p) }
            }
        }
        out
    }

    #[test]
    fn plan_exists_and_q_is_prime() {
        assert!(tfhe_ntt::prime::is_prime64(Q));
        assert_eq!((Q - 1) % (2 * N as u64), 0);
        assert!(Plan::try_new(N, Q).is_some());
        assert_eq!(Q, 4611686018427322369);
    }

    #[test]
    fn ntt_product_matches_schoolbook() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        // A sparse operand keeps the O(N²) reference fast; the other is dense.
        let a: Poly = (0..N).map(|_| rng.random_range(0..Q)).collect();
        let mut b = zero();
        for _ in 0..40 {
            b[rng.random_range(0..N)] = rng.random_range(0..Q);
        }
        b[N - 1] = Q - 1; // wraps negacyclically
        assert_eq!(mul(&a, &b), schoolbook(&a, &b));
        // X^(N-1) · X = X^N = −1.
        let mut x1 = zero();
        x1[1] = 1;
        let mut xn1 = zero();
        xn1[N - 1] = 1;
        let mut minus_one = zero();
        minus_one[0] = Q - 1;
        assert_eq!(mul(&x1, &xn1), minus_one);
    }

    #[test]
    fn normalised_transform_round_trips_and_multiplies() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(11);
        let x: Poly = (0..N).map(|_| rng.random_range(0..Q)).collect();
        let y: Poly = (0..N).map(|_| rng.random_range(0..Q)).collect();
        let mut e = x.clone();
        ntt(&mut e);
        normalize(&mut e);
        let mut back = e.clone();
        intt(&mut back);
        assert_eq!(back, x);
        // The decryptor's product: E(x) ⊙ (N·ntt(y)) / N, one inverse transform.
        let mut yn = y.clone();
        ntt(&mut yn);
        scale_assign(&mut yn, N as u64);
        mul_ntt_assign(&mut e, &yn);
        intt(&mut e);
        assert_eq!(e, mul(&x, &y));
    }

    #[test]
    fn known_answers() {
        assert_eq!(switch_to_pow2(Q - 1, 37), 0); // −1 rounds to 0 at the small scale
        assert_eq!(switch_to_pow2(Q / 2, 1), 1);
        assert_eq!(from_signed(-1), Q - 1);
        assert_eq!(centred(Q - 5), -5);
        assert_eq!(mul_mod(inv_mod(3).unwrap_or(0), 3), 1);
        assert_eq!(inv_mod(0), None);
    }

    proptest! {
        #[test]
        fn shoup_scaling_matches_u128(v in 0..Q, c in 0..Q) {
            let mut p = vec![v];
            scale_assign(&mut p, c);
            prop_assert_eq!(p[0], mul_mod(v, c));
        }

        #[test]
        fn modular_ops_agree_with_i128(a in 0..Q, b in 0..Q) {
            prop_assert_eq!(add_mod(a, b) as i128, (a as i128 + b as i128) % Q as i128);
            prop_assert_eq!(sub_mod(a, b) as i128, (a as i128 - b as i128).rem_euclid(Q as i128));
            prop_assert_eq!(from_signed(centred(a)), a);
        }
    }
}
