//! Encryption of packed fixed-point vectors under the collective public key,
//! and the coordinator's only operation on them: addition.
//!
//! A vector of b-bit values fills ⌈len/N⌉ blocks, one value per coefficient.
//! Block k of party i is (c0, c1) = (p·u + e0 + ⌊q·m/2^b⌉, a·u + e1) with u
//! ternary and e0, e1 Gaussian, all fresh per block. c0 is switched to 2^k
//! before upload (only its top bits carry the plaintext); c1 stays mod q
//! because decryption shares multiply it by Shamir shares, which are uniform
//! mod q. c1 travels in the NTT domain (normalised, so that the inverse
//! transform gives the polynomial): addition is the same in either domain,
//! and a decryptor then multiplies pointwise and transforms once instead of
//! twice. Forming it costs the encryptor nothing more (a·u is a pointwise
//! product already; e1 takes the transform a·u no longer needs).

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::keygen::PublicKey;
use super::pack;
use super::params::HeParams;
use super::ring::{self, N, Poly, Q};
use super::sample::{Csprng, SIGMA};
use crate::Error;

/// The encryption randomness of one upload, computed before the values are
/// known: (p·u + e0, a·u + e1) per block. Consumed by [`EncryptionMasks::encrypt`],
/// so one u is never used twice; zeroized on drop (p·u + e0 hides the plaintext).
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct EncryptionMasks {
    c0: Vec<u64>,
    c1: Vec<u64>,
}

/// One party's ciphertext: c0 mod 2^k and c1 mod q (in the NTT domain),
/// `blocks · N` slots each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ciphertext {
    /// Switched c0, each below 2^k.
    pub c0: Vec<u64>,
    /// c1 in the normalised NTT domain, each below q.
    pub c1: Vec<u64>,
}

impl PublicKey {
    /// Precomputes the randomness for an upload of `values` plaintext values
    /// (three NTTs per block). This is the part of encryption that can run
    /// before the round.
    pub fn precompute(&self, values: usize, rng: &mut Csprng) -> EncryptionMasks {
        let blocks = values.div_ceil(N).max(1);
        let mut c0 = Vec::with_capacity(blocks * N);
        let mut c1 = Vec::with_capacity(blocks * N);
        for _ in 0..blocks {
            let mut u = rng.ternary();
            ring::ntt(&mut u);
            let mut pu = self.p_ntt.clone();
            ring::mul_ntt_assign(&mut pu, &u);
            ring::intt(&mut pu);
            rng.add_gaussian(&mut pu, SIGMA);
            // c1 = a·u + e1 in the (normalised) NTT domain.
            let mut au: Poly = self.a_ntt.clone();
            ring::mul_ntt_assign(&mut au, &u);
            u.zeroize();
            let mut e1 = ring::zero();
            rng.add_gaussian(&mut e1, SIGMA);
            ring::ntt(&mut e1);
            ring::normalize(&mut e1);
            ring::add_assign(&mut au, &e1);
            e1.zeroize();
            c0.extend_from_slice(&pu);
            c1.extend_from_slice(&au);
            pu.zeroize();
        }
        EncryptionMasks { c0, c1 }
    }
}

/// ⌊q·m / 2^b⌉ for m < 2^b: the scaling that makes sums wrap modulo 2^b
/// exactly (Kim–Polyakov–Zucca 2021), as the distributed-DP encoding needs.
#[inline]
pub fn encode(m: u64, bits: u32) -> u64 {
    ((Q as u128 * m as u128 + (1u128 << (bits - 1))) >> bits) as u64
}

impl EncryptionMasks {
    /// Slots available (a multiple of N).
    pub fn slots(&self) -> usize {
        self.c1.len()
    }

    /// Encrypts `values` (each below 2^b) with this randomness, consuming it.
    pub fn encrypt(mut self, params: &HeParams, values: &[u32]) -> Result<Ciphertext, Error> {
        if values.len() > self.slots() {
            return Err(Error::InvalidInput(format!(
                "he: {} values for randomness precomputed for {} slots",
                values.len(),
                self.slots()
            )));
        }
        let limit = 1u64 << params.bits;
        if let Some(i) = values.iter().position(|&v| v as u64 >= limit) {
            return Err(Error::InvalidInput(format!("he: value {i} does not fit in {} bits", params.bits)));
        }
        let k = params.switch_bits;
        // Taken, not copied: the masks become the ciphertext in place (c0 is no
        // longer secret once the plaintext is added and it is switched).
        let mut c0 = std::mem::take(&mut self.c0);
        for (c, &m) in c0.iter_mut().zip(values) {
            *c = ring::add_mod(*c, encode(m as u64, params.bits));
        }
        for c in c0.iter_mut() {
            *c = ring::switch_to_pow2(*c, k);
        }
        let c1 = std::mem::take(&mut self.c1);
        Ok(Ciphertext { c0, c1 })
    }
}

impl Ciphertext {
    /// Wire form: c0 at k bits, then c1 at 62 bits.
    pub fn to_bytes(&self, params: &HeParams) -> Vec<u8> {
        let mut out = Vec::with_capacity(params.ciphertext_bytes(self.c1.len()));
        pack::pack(&self.c0, params.switch_bits, &mut out);
        pack::pack(&self.c1, 62, &mut out);
        out
    }

    /// Parses a ciphertext for `values` plaintext values from `from`, checking
    /// its exact size and every coefficient's range; errors name the sender.
    pub fn from_bytes(params: &HeParams, values: usize, bytes: &[u8], from: &str) -> Result<Ciphertext, Error> {
        let slots = values.div_ceil(N).max(1) * N;
        let bad = |reason: String| Error::PeerMisbehaved { party: from.into(), reason };
        let expected = params.ciphertext_bytes(slots);
        if bytes.len() != expected {
            return Err(bad(format!("ciphertext of {} bytes, expected {expected} for {values} values", bytes.len())));
        }
        let c0_len = pack::packed_len(slots, params.switch_bits);
        let c0 = pack::unpack(&bytes[..c0_len], slots, params.switch_bits, "ciphertext c0")
            .map_err(|e| bad(e.to_string()))?;
        let c1 = pack::unpack(&bytes[c0_len..], slots, 62, "ciphertext c1").map_err(|e| bad(e.to_string()))?;
        if c1.iter().any(|&c| c >= Q) {
            return Err(bad("ciphertext c1: coefficient not below q".into()));
        }
        Ok(Ciphertext { c0, c1 })
    }
}

/// The running sum of ciphertexts: c0 as unreduced integers (so a linear hash
/// over Z_q stays linear, and relays can forward partial sums) and c1 mod q.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    /// Σ c0 over the integers (reduced mod 2^k only when decoding).
    pub c0: Vec<u64>,
    /// Σ c1 mod q, in the normalised NTT domain as each c1 is.
    pub c1: Vec<u64>,
    /// Ciphertexts summed.
    pub count: usize,
}

impl Aggregate {
    /// An empty sum of `slots` coefficients.
    pub fn new(slots: usize) -> Aggregate {
        Aggregate { c0: vec![0; slots], c1: vec![0; slots], count: 0 }
    }

    /// Adds one ciphertext (or a relay's partial sum of `count` ciphertexts).
    pub fn add(&mut self, c0: &[u64], c1: &[u64], count: usize, params: &HeParams) -> Result<(), Error> {
        if c0.len() != self.c0.len() || c1.len() != self.c1.len() {
            return Err(Error::InvalidInput(format!(
                "he: adding a ciphertext of {} slots to a sum of {}",
                c1.len(),
                self.c1.len()
            )));
        }
        // Integer sums of k-bit values stay below 2^64 while count < 2^(64−k).
        let total = self.count + count;
        if (total as u128) >= (1u128 << (64 - params.switch_bits)) {
            return Err(Error::InvalidInput(format!("he: {total} ciphertexts overflow the c0 sum")));
        }
        for (a, &b) in self.c0.iter_mut().zip(c0) {
            *a = a.wrapping_add(b);
        }
        ring::add_assign(&mut self.c1, c1);
        self.count = total;
        Ok(())
    }
}
