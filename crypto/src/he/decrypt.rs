//! Threshold decryption: decryption shares with noise flooding, and their
//! combination with a cross-check so one bad share never yields a silently
//! wrong sum.
//!
//! Decryptor j in the announced set S sends d_j = λ_j^S·F(x_j)·c1 + e_j,
//! switched to 2^k, with e_j Gaussian of σ_f (the flood; added after the
//! Lagrange factor so that it stays small). c0 + Σ_{j∈S} d_j = Δ·M + V + Σ e_j.
//! If some of S do not answer (set Z), the identity x_z·λ_i^{S∖z} =
//! (x_z − x_i)·λ_i^S lets the combiner use small integer weights instead of
//! new Lagrange factors: X_Z·c0 + Σ_{i∈R} Π_{z∈Z}(x_z − x_i)·d_i decodes to
//! X_Z·M mod 2^b, and X_Z (a product of odd points) is invertible mod 2^b.

use super::encrypt::Aggregate;
use super::keygen::KeyShare;
use super::pack;
use super::params::HeParams;
use super::ring::{self, N, Q};
use super::sample::Csprng;
use crate::Error;

/// The flooding noise of one decryption share (Gaussian of σ_f, as residues
/// mod q), drawn before the aggregate is known. Consumed by
/// [`KeyShare::decryption_share_with`], so it never floods two shares (their
/// difference would cancel it); zeroized on drop, since with the share it
/// would reveal λ·F(x)·c1.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct FloodingNoise {
    noise: Vec<u64>,
    #[zeroize(skip)]
    sigma: f64,
}

impl FloodingNoise {
    /// Noise for a decryption of `slots` coefficients under `params`.
    pub fn draw(params: &HeParams, slots: usize, rng: &mut Csprng) -> FloodingNoise {
        let mut noise = vec![0u64; slots];
        rng.add_gaussian(&mut noise, params.flood_sigma);
        FloodingNoise { noise, sigma: params.flood_sigma }
    }

    /// The number of coefficients it floods.
    pub fn slots(&self) -> usize {
        self.noise.len()
    }
}

impl std::fmt::Debug for FloodingNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FloodingNoise({} slots, σ = {})", self.noise.len(), self.sigma)
    }
}

/// One decryptor's share, switched to 2^k.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecryptionShare(pub Vec<u64>);

impl DecryptionShare {
    /// Wire form: k bits per slot.
    pub fn to_bytes(&self, params: &HeParams) -> Vec<u8> {
        let mut out = Vec::with_capacity(pack::packed_len(self.0.len(), params.switch_bits));
        pack::pack(&self.0, params.switch_bits, &mut out);
        out
    }

    /// Parses a share of `slots` slots from `from`, naming it on any error.
    pub fn from_bytes(params: &HeParams, slots: usize, bytes: &[u8], from: &str) -> Result<DecryptionShare, Error> {
        pack::unpack(bytes, slots, params.switch_bits, "decryption share")
            .map(DecryptionShare)
            .map_err(|e| Error::PeerMisbehaved { party: from.into(), reason: e.to_string() })
    }
}

/// λ_j^S = Π_{m∈S, m≠j} x_m / (x_m − x_j) mod q.
pub fn lagrange_at_zero(points: &[i64], j: usize) -> Result<u64, Error> {
    let mut num = 1u64;
    let mut den = 1u64;
    for (m, &x) in points.iter().enumerate() {
        if m != j {
            num = ring::mul_mod(num, ring::from_signed(x));
            den = ring::mul_mod(den, ring::from_signed(x - points[j]));
        }
    }
    let inv = ring::inv_mod(den)
        .ok_or_else(|| Error::InvalidInput("he: repeated Shamir point in a decryption set".into()))?;
    Ok(ring::mul_mod(num, inv))
}

/// Checks an announced decryption set: sorted, unique, within the key's
/// parties, at least τ + 1 members (one surplus share to cross-check).
pub fn check_decryptors(params: &HeParams, decryptors: &[usize]) -> Result<(), Error> {
    if decryptors.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::InvalidInput("he: decryption set not sorted and unique".into()));
    }
    if let Some(&i) = decryptors.iter().find(|&&i| i >= params.key_parties) {
        return Err(Error::InvalidInput(format!("he: decryptor {i} outside the key's {} parties", params.key_parties)));
    }
    if decryptors.len() < params.threshold + 1 {
        return Err(Error::BelowThreshold(format!(
            "he: {} decryptors; a checked decryption needs at least τ + 1 = {}",
            decryptors.len(),
            params.threshold + 1
        )));
    }
    Ok(())
}

impl KeyShare {
    /// This party's decryption share of the aggregate's c1 (in the
    /// normalised NTT domain, as [`super::Aggregate`] holds it) for the
    /// announced set `decryptors` (key-party indices). Refuses a set without this party,
    /// a malformed set, or one that would exceed the key's flooding budget.
    /// The caller has already checked that `c1` is the sum it may decrypt
    /// (the linear hash).
    pub fn decryption_share(
        &mut self,
        params: &HeParams,
        c1: &[u64],
        decryptors: &[usize],
        rng: &mut Csprng,
    ) -> Result<DecryptionShare, Error> {
        let flood = FloodingNoise::draw(params, c1.len(), rng);
        self.decryption_share_with(params, c1, decryptors, flood)
    }

    /// [`KeyShare::decryption_share`] with flooding noise drawn beforehand
    /// (it does not depend on the aggregate), consumed here so that it
    /// floods one share only.
    pub fn decryption_share_with(
        &mut self,
        params: &HeParams,
        c1: &[u64],
        decryptors: &[usize],
        flood: FloodingNoise,
    ) -> Result<DecryptionShare, Error> {
        check_decryptors(params, decryptors)?;
        if flood.sigma.to_bits() != params.flood_sigma.to_bits() || flood.noise.len() != c1.len() {
            return Err(Error::InvalidInput(format!(
                "he: flooding noise for {} slots at σ = {} given for {} slots at σ = {}",
                flood.noise.len(),
                flood.sigma,
                c1.len(),
                params.flood_sigma
            )));
        }
        let me = decryptors
            .iter()
            .position(|&i| i == self.index)
            .ok_or_else(|| Error::InvalidInput(format!("he: decryption set without this party ({})", self.index)))?;
        if c1.is_empty() || !c1.len().is_multiple_of(N) || c1.iter().any(|&c| c >= Q) {
            return Err(Error::InvalidInput("he: aggregate c1 is not whole blocks of values below q".into()));
        }
        let after = self.decrypted + c1.len() as u64;
        if after > params.key_budget {
            return Err(Error::InvalidInput(format!(
                "he: key budget exhausted: {} of {} coefficients already decrypted under this key; a new key epoch is needed",
                self.decrypted, params.key_budget
            )));
        }
        let points: Vec<i64> = decryptors.iter().map(|&i| super::params::point(i)).collect();
        let lambda = lagrange_at_zero(&points, me)?;
        // c1 comes in the normalised NTT domain and mul_ntt_assign divides by
        // N once more: λ·N cancels it, so one inverse transform per block
        // gives λ·F(x_j)·c1.
        let mut scaled = self.y_ntt.clone();
        ring::scale_assign(&mut scaled, ring::mul_mod(lambda, N as u64));
        let k = params.switch_bits;
        let mut out = Vec::with_capacity(c1.len());
        let mut block = vec![0u64; N];
        for (chunk, noise) in c1.chunks_exact(N).zip(flood.noise.chunks_exact(N)) {
            block.copy_from_slice(chunk);
            ring::mul_ntt_assign(&mut block, &scaled);
            ring::intt(&mut block);
            out.extend(block.iter().zip(noise).map(|(&v, &e)| ring::switch_to_pow2(ring::add_mod(v, e), k)));
        }
        zeroize::Zeroize::zeroize(&mut scaled);
        zeroize::Zeroize::zeroize(&mut block);
        self.decrypted = after;
        Ok(DecryptionShare(out))
    }
}

/// The result of combining decryption shares.
#[derive(Debug, PartialEq, Eq)]
pub struct Decrypted {
    /// The sum, each value modulo 2^b.
    pub values: Vec<u32>,
    /// Decryptors (their key-party indices, as in `decryptors`) whose
    /// leave-one-out combination was consistent when the whole set was not;
    /// the sum was combined without the first. *Suspected*, not convicted: a bad share
    /// from one of them fits, but so does a contributor's ciphertext (or a
    /// dealer's key share) crafted to imitate one, since the aggregate's c0
    /// enters every combination as a share at point 0 would (found by
    /// review). Telling these apart needs proofs this scheme does not have.
    pub suspected: Vec<usize>,
}

/// Combines the aggregate with the decryptors' shares (`shares[i]` from
/// `decryptors[i]`, `None` if it did not answer) into the first `values`
/// plaintext sums. `contributors` is the number of ciphertexts summed.
///
/// Needs τ + 1 answers: the combination of all answers is compared with one
/// that leaves a share out, each with a residual check against its honest
/// noise bound; they agree only if the result is right (a single bad share
/// shifts them differently). With τ + 2 answers each share whose leaving out
/// makes the rest check is reported as suspected, and the result is
/// recomputed without the first. Below that, or when the shares cannot be
/// reconciled, the error lists who to suspect (the decryptors, and the
/// contributors and dealers, whose faults look alike) and no sum is returned.
pub fn combine(
    params: &HeParams,
    aggregate: &Aggregate,
    decryptors: &[usize],
    shares: &[Option<DecryptionShare>],
    values: usize,
) -> Result<Decrypted, Error> {
    check_decryptors(params, decryptors)?;
    if shares.len() != decryptors.len() {
        return Err(Error::InvalidInput("he: one share slot per decryptor".into()));
    }
    let slots = aggregate.c1.len();
    if values > slots {
        return Err(Error::InvalidInput(format!("he: {values} values from an aggregate of {slots} slots")));
    }
    for (i, s) in shares.iter().enumerate() {
        if let Some(s) = s
            && s.0.len() != slots
        {
            return Err(Error::PeerMisbehaved {
                party: format!("key party {}", decryptors[i]),
                reason: format!("decryption share of {} slots, expected {slots}", s.0.len()),
            });
        }
    }
    let answered: Vec<usize> = (0..decryptors.len()).filter(|&i| shares[i].is_some()).collect();
    if answered.len() < params.threshold + 1 {
        let missing: Vec<usize> =
            (0..decryptors.len()).filter(|&i| shares[i].is_none()).map(|i| decryptors[i]).collect();
        return Err(Error::BelowThreshold(format!(
            "he: {} decryption shares, a checked decryption needs {} (missing key parties {missing:?})",
            answered.len(),
            params.threshold + 1
        )));
    }
    let ctx = Ctx { params, aggregate, decryptors, shares };
    if let Ok(v) = ctx.consistent(&answered) {
        return Ok(Decrypted { values: v[..values].to_vec(), suspected: vec![] });
    }
    if answered.len() < params.threshold + 2 {
        return Err(Error::PeerMisbehaved {
            party: format!(
                "one of key parties {:?}, or a contributor or dealer",
                answered.iter().map(|&i| decryptors[i]).collect::<Vec<_>>()
            ),
            reason: "the decryption failed the cross-check; τ + 2 answers are needed to combine without one share"
                .into(),
        });
    }
    let mut candidates = Vec::new();
    let mut result = None;
    for (pos, &b) in answered.iter().enumerate() {
        let mut rest = answered.clone();
        rest.remove(pos);
        if let Ok(v) = ctx.consistent(&rest) {
            candidates.push(decryptors[b]);
            result.get_or_insert(v);
        }
    }
    match result {
        // Any consistent set of τ + 1 shares decodes to the true sum (see
        // above); every candidate is reported, one or several.
        Some(v) => Ok(Decrypted { values: v[..values].to_vec(), suspected: candidates }),
        None => Err(Error::PeerMisbehaved {
            party: format!(
                "one or more of: the contributors, the key's dealers, key parties {:?}",
                answered.iter().map(|&i| decryptors[i]).collect::<Vec<_>>()
            ),
            reason: "the decryption does not check, beyond one bad share; no sum".into(),
        }),
    }
}

struct Ctx<'a> {
    params: &'a HeParams,
    aggregate: &'a Aggregate,
    decryptors: &'a [usize],
    shares: &'a [Option<DecryptionShare>],
}

impl Ctx<'_> {
    /// Decodes with `subset` (positions in the decryption set) and with the
    /// subset less its first member; both must pass their residual checks and agree.
    fn consistent(&self, subset: &[usize]) -> Result<Vec<u32>, Error> {
        let full = self.decode(subset)?;
        let check = self.decode(&subset[1..])?;
        if full != check {
            return Err(Error::PeerMisbehaved { party: "decryptors".into(), reason: "leave-one-out mismatch".into() });
        }
        Ok(full)
    }

    /// X·c0 + Σ w_i·d_i mod 2^k over `subset`, decoded and multiplied by X^{-1} mod 2^b.
    fn decode(&self, subset: &[usize]) -> Result<Vec<u32>, Error> {
        let p = self.params;
        if subset.len() < p.threshold {
            return Err(Error::BelowThreshold("he: combination below the threshold".into()));
        }
        let points: Vec<i64> = self.decryptors.iter().map(|&i| super::params::point(i)).collect();
        let erased: Vec<usize> = (0..self.decryptors.len()).filter(|i| !subset.contains(i)).collect();
        let x: i128 = erased.iter().map(|&z| points[z] as i128).product();
        let weights: Vec<i128> =
            subset.iter().map(|&i| erased.iter().map(|&z| (points[z] - points[i]) as i128).product()).collect();
        let k = p.switch_bits;
        let b = p.bits;
        let bound = p.decode_bound(self.aggregate.count, x, &weights);
        if bound >= (1u64 << (k - b - 1)) as f64 {
            return Err(Error::BelowThreshold(format!(
                "he: {} decryption shares missing; the remaining ones cannot be decoded exactly",
                erased.len()
            )));
        }
        let bound = bound.ceil() as u64;
        let kmask = if k == 64 { u64::MAX } else { (1u64 << k) - 1 };
        let mut acc: Vec<u64> = self.aggregate.c0.iter().map(|&c| c.wrapping_mul(x as u64)).collect();
        for (&i, &w) in subset.iter().zip(&weights) {
            let Some(share) = &self.shares[i] else {
                return Err(Error::BelowThreshold("he: combination over a missing share".into()));
            };
            let w = w as u64;
            for (a, &d) in acc.iter_mut().zip(&share.0) {
                *a = a.wrapping_add(d.wrapping_mul(w));
            }
        }
        let shift = k - b;
        let half = 1u64 << (shift - 1);
        let step_mask = (1u64 << shift) - 1;
        let bmask = (1u64 << b) - 1;
        let x_inv = inverse_mod_2_64(x as u64);
        let mut out = Vec::with_capacity(acc.len());
        for (slot, &w) in acc.iter().enumerate() {
            let w = w & kmask;
            let shifted = w.wrapping_add(half) & kmask;
            let residual = (shifted & step_mask) as i64 - half as i64;
            if residual.unsigned_abs() > bound {
                return Err(Error::PeerMisbehaved {
                    party: "decryptors".into(),
                    reason: format!("slot {slot}: residual {residual} beyond the noise bound {bound}"),
                });
            }
            let m = shifted >> shift;
            out.push((m.wrapping_mul(x_inv) & bmask) as u32);
        }
        Ok(out)
    }
}

/// The inverse of an odd `x` modulo 2^64 (Newton–Hensel: five steps double the
/// correct bits from 3 to 96).
pub(crate) fn inverse_mod_2_64(x: u64) -> u64 {
    let mut y = x; // correct to 3 bits for odd x
    for _ in 0..5 {
        y = y.wrapping_mul(2u64.wrapping_sub(x.wrapping_mul(y)));
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_mod_2_64_known_answers() {
        for x in [1u64, 3, 5, (-3i64) as u64, 81, 0xffff_ffff_ffff_fffd] {
            assert_eq!(x.wrapping_mul(inverse_mod_2_64(x)), 1);
        }
    }

    #[test]
    fn lagrange_interpolates_a_line() {
        // f(x) = 7 + 2x at points 1, −1, 3 → f(0) = 7.
        let pts = [1i64, -1, 3];
        let mut acc = 0u64;
        for (j, &x) in pts.iter().enumerate() {
            let y = ring::from_signed(7 + 2 * x);
            acc = ring::add_mod(acc, ring::mul_mod(lagrange_at_zero(&pts, j).unwrap(), y));
        }
        assert_eq!(acc, 7);
        assert!(lagrange_at_zero(&[1, 1], 0).is_err());
    }
}
