//! Dealer-free Shamir key generation (Mouchet et al., PETS 2021, with Shamir
//! shares as in their threshold variant): every party deals its own ternary
//! secret s_i, publishes p_i = −a·s_i + e_i and sends party j the share
//! F_i(x_j) of a random polynomial with F_i(0) = s_i. The collective secret
//! s = Σ s_i is never formed anywhere; party j holds F(x_j) = Σ_i F_i(x_j),
//! and any τ such values reconstruct s·c1 for a ciphertext, never s itself.

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::params::HeParams;
use super::ring::{self, N, Poly, Q};
use super::sample::{Csprng, PublicCsprng, SIGMA};
use crate::Error;

/// The common random polynomial a, in the NTT domain: uniform, derived from a
/// public transcript (the signed spec hash and the key epoch), so no party and
/// not the coordinator chooses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommonPoly {
    pub(crate) a_ntt: Poly,
}

impl CommonPoly {
    /// a = XOF(transcript). Sampled directly in the NTT domain: the NTT is a
    /// bijection, so a uniform NTT vector is a uniform polynomial.
    pub fn derive(transcript: &[u8]) -> CommonPoly {
        CommonPoly { a_ntt: PublicCsprng::from_transcript(transcript, *b"CnfdHEa0").uniform() }
    }
}

/// p_i = −a·s_i + e_i: one party's contribution to the collective public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeyShare(pub(crate) Poly);

/// One dealer's Shamir share for one recipient: F_i(x_j), N values mod q.
/// Secret; zeroized on drop.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretShare {
    /// Index (in the key's party order) of the dealer.
    pub dealer: usize,
    /// Index of the recipient.
    pub recipient: usize,
    values: Poly,
}

impl std::fmt::Debug for SecretShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretShare({} → {}, ..)", self.dealer, self.recipient)
    }
}

/// What a dealer produces: its public-key share and one secret share per
/// party (its own included). The dealer's secret itself is dropped (zeroized)
/// here: nobody needs s_i again.
#[derive(Debug)]
pub struct Dealing {
    /// p_i, to be committed (hashed and signed) before any is revealed.
    pub public_share: PublicKeyShare,
    /// F_i(x_j) for every party j, to be sent encrypted to j.
    pub shares: Vec<SecretShare>,
}

/// A dealer's secret s_i between committing to p_i and dealing its shares:
/// the key epoch's size (and so the Shamir threshold) is known only once
/// every commitment is in. Consumed by [`DealerSecret::deal`]; zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DealerSecret {
    secret: Poly,
}

impl std::fmt::Debug for DealerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DealerSecret(..)")
    }
}

impl DealerSecret {
    /// Draws s_i (ternary) and e_i and returns s_i with p_i = e_i − a·s_i,
    /// which the dealer commits to before anyone reveals theirs.
    pub fn generate(crp: &CommonPoly, rng: &mut Csprng) -> (DealerSecret, PublicKeyShare) {
        let secret = rng.ternary();
        let mut a_s = secret.clone();
        ring::ntt(&mut a_s);
        ring::mul_ntt_assign(&mut a_s, &crp.a_ntt);
        ring::intt(&mut a_s);
        let mut public = rng.gaussian(SIGMA);
        ring::sub_assign(&mut public, &a_s);
        a_s.zeroize();
        (DealerSecret { secret }, PublicKeyShare(public))
    }

    /// Shares s_i among the key's `params.key_parties` parties as `dealer`:
    /// F_i(x_j) for every j, F_i of degree τ − 1 with uniform coefficients.
    pub fn deal(self, params: &HeParams, dealer: usize, rng: &mut Csprng) -> Result<Vec<SecretShare>, Error> {
        if dealer >= params.key_parties {
            return Err(Error::InvalidInput(format!(
                "he: dealer index {dealer} outside the key's {} parties",
                params.key_parties
            )));
        }
        let mut coefficients: Vec<Poly> = (1..params.threshold).map(|_| rng.uniform()).collect();
        let shares = params
            .points()
            .iter()
            .enumerate()
            .map(|(recipient, &x)| {
                let x = ring::from_signed(x);
                // Horner: ((R_{τ−1}·x + R_{τ−2})·x + …)·x + s_i
                let mut y = ring::zero();
                for c in coefficients.iter().rev() {
                    ring::add_assign(&mut y, c);
                    ring::scale_assign(&mut y, x);
                }
                ring::add_assign(&mut y, &self.secret);
                SecretShare { dealer, recipient, values: y }
            })
            .collect();
        for c in coefficients.iter_mut() {
            c.zeroize();
        }
        Ok(shares)
    }
}

/// Deals party `dealer`'s key material for a key of `params.key_parties`
/// parties in one step (when the key's size is known up front).
pub fn deal(params: &HeParams, crp: &CommonPoly, dealer: usize, rng: &mut Csprng) -> Result<Dealing, Error> {
    if dealer >= params.key_parties {
        return Err(Error::InvalidInput(format!(
            "he: dealer index {dealer} outside the key's {} parties",
            params.key_parties
        )));
    }
    let (secret, public_share) = DealerSecret::generate(crp, rng);
    let shares = secret.deal(params, dealer, rng)?;
    Ok(Dealing { public_share, shares })
}

impl PublicKeyShare {
    /// Wire form: N values mod q at 62 bits.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        super::pack::pack(&self.0, 62, &mut out);
        out
    }

    /// Parses [`PublicKeyShare::to_bytes`]; `from` names the sender in errors.
    pub fn from_bytes(bytes: &[u8], from: &str) -> Result<PublicKeyShare, Error> {
        let v = unpack_mod_q(bytes, from, "public-key share")?;
        Ok(PublicKeyShare(v))
    }
}

impl SecretShare {
    /// Wire form (to be sent only inside an authenticated encryption to the recipient).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        super::pack::pack(&self.values, 62, &mut out);
        out
    }

    /// Parses [`SecretShare::to_bytes`] from `dealer` for `recipient`.
    pub fn from_bytes(bytes: &[u8], dealer: usize, recipient: usize, from: &str) -> Result<SecretShare, Error> {
        let values = unpack_mod_q(bytes, from, "key share")?;
        Ok(SecretShare { dealer, recipient, values })
    }
}

fn unpack_mod_q(bytes: &[u8], from: &str, what: &str) -> Result<Poly, Error> {
    // Wiped if refused (the coefficients may be a key share's).
    let mut v = zeroize::Zeroizing::new(
        super::pack::unpack(bytes, N, 62, what)
            .map_err(|e| Error::PeerMisbehaved { party: from.into(), reason: e.to_string() })?,
    );
    if v.iter().any(|&c| c >= Q) {
        return Err(Error::PeerMisbehaved { party: from.into(), reason: format!("{what}: coefficient not below q") });
    }
    Ok(std::mem::take(&mut *v))
}

/// The collective public key (p, a) = (Σ_{i∈K} p_i, a) over the dealer set K,
/// kept in the NTT domain for encryption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub(crate) p_ntt: Poly,
    pub(crate) a_ntt: Poly,
}

impl PublicKey {
    /// Sums the dealers' public-key shares (each already checked against its
    /// signed commitment by the caller).
    pub fn assemble(crp: &CommonPoly, shares: &[PublicKeyShare]) -> Result<PublicKey, Error> {
        if shares.is_empty() {
            return Err(Error::BelowThreshold("he: no public-key shares".into()));
        }
        let mut p = ring::zero();
        for s in shares {
            ring::add_assign(&mut p, &s.0);
        }
        ring::ntt(&mut p);
        Ok(PublicKey { p_ntt: p, a_ntt: crp.a_ntt.clone() })
    }

    /// A hash of the key, for parties to sign that they agree on it.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for v in self.p_ntt.iter().chain(&self.a_ntt) {
            h.update(&v.to_le_bytes());
        }
        *h.finalize().as_bytes()
    }
}

/// Party j's share F(x_j) = Σ_{i∈K} F_i(x_j) of the collective secret, in the
/// NTT domain, with the count of coefficients it has helped decrypt (the
/// flooding budget). Zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct KeyShare {
    #[zeroize(skip)]
    pub(crate) index: usize,
    pub(crate) y_ntt: Poly,
    #[zeroize(skip)]
    pub(crate) decrypted: u64,
}

impl std::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyShare(party {}, {} coefficients decrypted)", self.index, self.decrypted)
    }
}

impl KeyShare {
    /// Sums the shares addressed to party `index` by the dealers of K, one per
    /// dealer. `decrypted` restores the budget already used (persisted by the party).
    pub fn assemble(
        params: &HeParams,
        index: usize,
        shares: &[SecretShare],
        decrypted: u64,
    ) -> Result<KeyShare, Error> {
        if index >= params.key_parties {
            return Err(Error::InvalidInput(format!(
                "he: party index {index} outside the key's {} parties",
                params.key_parties
            )));
        }
        let mut dealers: Vec<usize> = shares.iter().map(|s| s.dealer).collect();
        dealers.sort_unstable();
        dealers.dedup();
        if dealers.len() != shares.len() {
            return Err(Error::InvalidInput("he: two key shares from the same dealer".into()));
        }
        if let Some(s) = shares.iter().find(|s| s.recipient != index) {
            return Err(Error::InvalidInput(format!("he: key share for party {} given to party {index}", s.recipient)));
        }
        if shares.len() < params.threshold {
            return Err(Error::BelowThreshold(format!(
                "he: {} dealers, fewer than the threshold {}",
                shares.len(),
                params.threshold
            )));
        }
        let mut y = ring::zero();
        for s in shares {
            ring::add_assign(&mut y, &s.values);
        }
        ring::ntt(&mut y);
        Ok(KeyShare { index, y_ntt: y, decrypted })
    }

    /// The party's index in the key's party order.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Coefficients decrypted with this share so far (persist it).
    pub fn decrypted(&self) -> u64 {
        self.decrypted
    }
}
