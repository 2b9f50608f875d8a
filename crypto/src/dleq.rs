//! Diffie–Hellman over Ristretto with a provable shared value: a party can
//! reveal the value it shares with a peer together with a Chaum–Pedersen
//! proof of discrete-log equality, so a third party (the coordinator) can
//! check a complaint about what the peer sealed under it.
//!
//! The statement: for the committed public keys X = x·B (the complainer's)
//! and Y (the peer's), the revealed K satisfies K = x·Y, i.e.
//! log_B(X) = log_Y(K). The proof (Chaum–Pedersen 1992, made non-interactive
//! with Fiat–Shamir over SHA-512) is (c, s) with T1 = s·B − c·X,
//! T2 = s·Y − c·K and c = H(context, X, Y, K, T1, T2). It is zero-knowledge
//! for x: revealing K exposes only what K itself keys, which is why each
//! pair's keys are drawn fresh per key epoch and used for that epoch's
//! sealed shares only. Ristretto is a prime-order group, so there are no
//! small-subgroup components for K to leak or a proof to hide.

use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha512};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::Error;

/// Domain of the proof's challenge.
const DOMAIN: &[u8] = b"confide-dleq-v1";
/// Domain of a proof of possession's challenge.
const POSSESSION_DOMAIN: &[u8] = b"confide-key-possession-v1";

/// A Diffie–Hellman secret: a Ristretto scalar, wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct DhSecret(Scalar);

/// A proof that a revealed shared value is the Diffie–Hellman value of two
/// public keys (64 bytes on the wire: c then s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DleqProof {
    c: Scalar,
    s: Scalar,
}

fn random_scalar(rng: &mut (impl RngCore + CryptoRng)) -> Scalar {
    let mut wide = Zeroizing::new([0u8; 64]);
    rng.fill_bytes(wide.as_mut_slice());
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// A public key from its 32 bytes; the identity (which would make every
/// shared value the identity) and non-canonical encodings are refused.
fn point(bytes: &[u8; 32], whose: &str) -> Result<RistrettoPoint, Error> {
    CompressedRistretto(*bytes).decompress().filter(|p| *p != RistrettoPoint::default()).ok_or_else(|| {
        Error::PeerMisbehaved { party: whose.to_owned(), reason: "a malformed Diffie–Hellman key".into() }
    })
}

/// Checks that `bytes` is a usable public key, naming `whose` if not.
pub fn check_public(bytes: &[u8; 32], whose: &str) -> Result<(), Error> {
    point(bytes, whose).map(|_| ())
}

fn challenge(context: &[u8], points: [&RistrettoPoint; 5]) -> Scalar {
    challenge_in(DOMAIN, context, &points)
}

fn challenge_in(domain: &[u8], context: &[u8], points: &[&RistrettoPoint]) -> Scalar {
    let mut h = Sha512::new();
    h.update((domain.len() as u64).to_le_bytes());
    h.update(domain);
    h.update((context.len() as u64).to_le_bytes());
    h.update(context);
    for p in points {
        h.update(p.compress().as_bytes());
    }
    let wide: [u8; 64] = h.finalize().into();
    Scalar::from_bytes_mod_order_wide(&wide)
}

/// A complaint about a dealer as it travels (in secagg's masked inputs and
/// `he`'s upload records alike): "the dealer's share to me, under its
/// signature, does not open", with the pairwise value and its proof, so
/// that the coordinator can open the share itself and convict the dealer
/// or the complainer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireComplaint {
    /// The dealer complained about.
    #[prost(string, tag = "1")]
    pub dealer: String,
    /// The complainer's and dealer's Diffie–Hellman value (32 bytes).
    #[prost(bytes = "vec", tag = "2")]
    pub shared: Vec<u8>,
    /// Its proof ([`DleqProof::to_bytes`], 64 bytes).
    #[prost(bytes = "vec", tag = "3")]
    pub proof: Vec<u8>,
}

/// A proof that whoever published a public key knows its secret (Schnorr,
/// made non-interactive with Fiat–Shamir; 64 bytes on the wire: c then s).
///
/// Why: a complaint reveals x·Y for the complainer's secret x and a peer's
/// key Y. Were Y a key its owner does not know the secret of — a multiple
/// a·X′ of an honest party's key — that value would be a·(x·X′), the
/// complainer's shared value with that honest party, and would open what
/// the two sealed to each other (found by review). With the proof checked
/// before any complaint, x·Y is a value Y's owner computes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PossessionProof {
    c: Scalar,
    s: Scalar,
}

impl PossessionProof {
    /// Wire form: c ‖ s.
    pub fn to_bytes(&self) -> [u8; 64] {
        DleqProof { c: self.c, s: self.s }.to_bytes()
    }

    /// From the wire; non-canonical scalars are refused (`whose` named).
    pub fn from_bytes(bytes: &[u8], whose: &str) -> Result<PossessionProof, Error> {
        let DleqProof { c, s } = DleqProof::from_bytes(bytes, whose)?;
        Ok(PossessionProof { c, s })
    }
}

/// Checks that `public`'s owner (`whose`) knows its secret, proven for
/// `context` (which must name the round and the owner).
pub fn verify_possession(public: &[u8; 32], proof: &PossessionProof, context: &[u8], whose: &str) -> Result<(), Error> {
    let x = point(public, whose)?;
    let t = RistrettoPoint::vartime_double_scalar_mul_basepoint(&-proof.c, &x, &proof.s);
    if challenge_in(POSSESSION_DOMAIN, context, &[&x, &t]) != proof.c {
        return Err(Error::PeerMisbehaved {
            party: whose.to_owned(),
            reason: "a Diffie–Hellman key without a valid proof that its owner knows the secret".into(),
        });
    }
    Ok(())
}

impl DhSecret {
    /// A proof that the owner of [`DhSecret::public`] knows this secret,
    /// bound to `context`.
    pub fn prove_possession(&self, context: &[u8], rng: &mut (impl RngCore + CryptoRng)) -> PossessionProof {
        let x = &self.0 * RISTRETTO_BASEPOINT_TABLE;
        let mut nonce = random_scalar(rng);
        let t = &nonce * RISTRETTO_BASEPOINT_TABLE;
        let c = challenge_in(POSSESSION_DOMAIN, context, &[&x, &t]);
        let mut cx = c * self.0;
        let s = nonce + cx;
        nonce.zeroize();
        cx.zeroize();
        PossessionProof { c, s }
    }

    /// A fresh secret from a cryptographic RNG.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> DhSecret {
        DhSecret(random_scalar(rng))
    }

    /// The public key x·B.
    pub fn public(&self) -> [u8; 32] {
        (&self.0 * RISTRETTO_BASEPOINT_TABLE).compress().to_bytes()
    }

    /// The value shared with the holder of `peer` (named `whose` in errors).
    pub fn agree(&self, peer: &[u8; 32], whose: &str) -> Result<Zeroizing<[u8; 32]>, Error> {
        let shared = self.0 * point(peer, whose)?;
        Ok(Zeroizing::new(shared.compress().to_bytes()))
    }

    /// The value shared with `peer`, with a proof that it is, bound to
    /// `context` (which must name the round and both parties, so the proof
    /// cannot be replayed elsewhere).
    pub fn reveal(
        &self,
        peer: &[u8; 32],
        whose: &str,
        context: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<([u8; 32], DleqProof), Error> {
        let y = point(peer, whose)?;
        let x = &self.0 * RISTRETTO_BASEPOINT_TABLE;
        let k = self.0 * y;
        let mut nonce = random_scalar(rng);
        let t1 = &nonce * RISTRETTO_BASEPOINT_TABLE;
        let t2 = nonce * y;
        let c = challenge(context, [&x, &y, &k, &t1, &t2]);
        let s = nonce + c * self.0;
        nonce.zeroize();
        Ok((k.compress().to_bytes(), DleqProof { c, s }))
    }
}

impl DleqProof {
    /// Wire form: c ‖ s.
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        out[..32].copy_from_slice(self.c.as_bytes());
        out[32..].copy_from_slice(self.s.as_bytes());
        out
    }

    /// From the wire; non-canonical scalars are refused (`whose` named).
    pub fn from_bytes(bytes: &[u8], whose: &str) -> Result<DleqProof, Error> {
        let bad = || Error::PeerMisbehaved { party: whose.to_owned(), reason: "a malformed proof".into() };
        let bytes: &[u8; 64] = bytes.try_into().map_err(|_| bad())?;
        let scalar = |b: &[u8]| -> Result<Scalar, Error> {
            let b: [u8; 32] = b.try_into().map_err(|_| bad())?;
            Option::from(Scalar::from_canonical_bytes(b)).ok_or_else(bad)
        };
        Ok(DleqProof { c: scalar(&bytes[..32])?, s: scalar(&bytes[32..])? })
    }
}

/// Checks that `shared` is the Diffie–Hellman value of `prover`'s key and
/// `peer`'s (both as committed), proven by `prover` for `context`.
pub fn verify(
    prover: &[u8; 32],
    peer: &[u8; 32],
    shared: &[u8; 32],
    proof: &DleqProof,
    context: &[u8],
    prover_name: &str,
) -> Result<(), Error> {
    let x = point(prover, prover_name)?;
    let y = point(peer, "peer")?;
    let k = CompressedRistretto(*shared).decompress().ok_or_else(|| Error::PeerMisbehaved {
        party: prover_name.to_owned(),
        reason: "revealed a shared value that is not a group element".into(),
    })?;
    let t1 = RistrettoPoint::vartime_double_scalar_mul_basepoint(&-proof.c, &x, &proof.s);
    let t2 = proof.s * y - proof.c * k;
    if challenge(context, [&x, &y, &k, &t1, &t2]) != proof.c {
        return Err(Error::PeerMisbehaved {
            party: prover_name.to_owned(),
            reason: "revealed a shared value whose proof does not check".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    /// Two reproducible secrets (the seeded RNG is rand 0.9's, so the bytes
    /// are drawn here rather than through `DhSecret::generate`).
    fn pair(seed: u64) -> (DhSecret, DhSecret) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        let mut secret = || {
            let mut w = [0u8; 64];
            rand::RngCore::fill_bytes(&mut rng, &mut w);
            DhSecret(Scalar::from_bytes_mod_order_wide(&w))
        };
        (secret(), secret())
    }

    /// Known answers: the Ristretto basepoint's encoding and 2·B's (from
    /// the Ristretto test vectors, draft-irtf-cfrg-ristretto255 A.1).
    #[test]
    fn known_answers() {
        let one = DhSecret(Scalar::ONE);
        assert_eq!(hex(&one.public()), "e2f2ae0a6abc4e71a884a961c500515f58e30b6aa582dd8db6a65945e08d2d76");
        let two = DhSecret(Scalar::from(2u8));
        assert_eq!(hex(&two.public()), "6a493210f7499cd17fecb510ae0cea23a110e8d5b901f8acadd3095c73a3b919");
        // x·(y·B) = y·(x·B): 1·(2B) is 2B.
        assert_eq!(*one.agree(&two.public(), "p").unwrap(), two.public());
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn both_sides_agree_and_an_honest_reveal_verifies() {
        let (a, b) = pair(1);
        let k_ab = a.agree(&b.public(), "b").unwrap();
        let k_ba = b.agree(&a.public(), "a").unwrap();
        assert_eq!(*k_ab, *k_ba);
        let (k, proof) = a.reveal(&b.public(), "b", b"round 1 | a | b", &mut rand_core::OsRng).unwrap();
        assert_eq!(k, *k_ab);
        let proof = DleqProof::from_bytes(&proof.to_bytes(), "a").unwrap();
        verify(&a.public(), &b.public(), &k, &proof, b"round 1 | a | b", "a").unwrap();
    }

    /// A proof of possession verifies for its key and context only; a key
    /// made from another party's (a·X′, whose secret nobody knows) has no
    /// proof, and one made for the original key does not carry over.
    #[test]
    fn a_proof_of_possession_holds_for_its_key_and_context_only() {
        let (a, b) = pair(4);
        let ctx = b"job | round 1 | a";
        let proof = a.prove_possession(ctx, &mut rand_core::OsRng);
        let proof = PossessionProof::from_bytes(&proof.to_bytes(), "a").unwrap();
        verify_possession(&a.public(), &proof, ctx, "a").unwrap();
        let refused = |r: Result<(), Error>| matches!(r, Err(Error::PeerMisbehaved { party, .. }) if party == "a");
        assert!(refused(verify_possession(&a.public(), &proof, b"job | round 2 | a", "a")));
        assert!(refused(verify_possession(&b.public(), &proof, ctx, "a")));
        // The related key 3·A (its owner knows no secret of it).
        let related = (Scalar::from(3u8) * point(&a.public(), "a").unwrap()).compress().to_bytes();
        assert!(refused(verify_possession(&related, &proof, ctx, "a")));
        let mut bytes = proof.to_bytes();
        bytes[40] ^= 1;
        let bent = PossessionProof::from_bytes(&bytes, "a");
        assert!(bent.is_err() || refused(verify_possession(&a.public(), &bent.unwrap(), ctx, "a")));
        // Domain-separated: the same proof made under the DLEQ proof's
        // domain does not verify, and under its own it does.
        let made_in = |domain: &[u8]| {
            let (x, nonce) = (&a.0 * RISTRETTO_BASEPOINT_TABLE, Scalar::from(7u8));
            let t = &nonce * RISTRETTO_BASEPOINT_TABLE;
            let c = challenge_in(domain, ctx, &[&x, &t]);
            PossessionProof { c, s: nonce + c * a.0 }
        };
        verify_possession(&a.public(), &made_in(POSSESSION_DOMAIN), ctx, "a").unwrap();
        assert!(refused(verify_possession(&a.public(), &made_in(DOMAIN), ctx, "a")));
    }

    /// What a lying complainer or a replaying coordinator would try: a
    /// wrong shared value, another context, another peer's key, a proof
    /// made for another statement, a malformed point or proof.
    #[test]
    fn forged_reveals_are_refused_naming_the_prover() {
        let (a, b) = pair(2);
        let (c, _) = pair(3);
        let ctx = b"round 1 | a | b";
        let (k, proof) = a.reveal(&b.public(), "b", ctx, &mut rand_core::OsRng).unwrap();
        let named = |r: Result<(), Error>| match r {
            Err(Error::PeerMisbehaved { party, .. }) => party,
            other => panic!("{other:?}"),
        };
        // A different value (here, a's value with c) under the same proof.
        let other = *a.agree(&c.public(), "c").unwrap();
        assert_eq!(named(verify(&a.public(), &b.public(), &other, &proof, ctx, "a")), "a");
        // Another context (a replay into another round or pair).
        assert_eq!(named(verify(&a.public(), &b.public(), &k, &proof, b"round 2 | a | b", "a")), "a");
        // Claimed for another peer.
        assert_eq!(named(verify(&a.public(), &c.public(), &k, &proof, ctx, "a")), "a");
        // Claimed as another prover's.
        assert_eq!(named(verify(&c.public(), &b.public(), &k, &proof, ctx, "c")), "c");
        // Not a group element.
        assert_eq!(named(verify(&a.public(), &b.public(), &[0xff; 32], &proof, ctx, "a")), "a");
        // A non-canonical scalar in the proof, or the wrong length.
        let mut bytes = proof.to_bytes();
        bytes[31] = 0xff;
        assert!(DleqProof::from_bytes(&bytes, "a").is_err());
        assert!(DleqProof::from_bytes(&bytes[..63], "a").is_err());
        // The identity as a public key would make every shared value the identity.
        assert!(check_public(&[0; 32], "a").is_err());
        assert!(b.agree(&[0; 32], "a").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn reveals_verify_and_any_flipped_bit_fails(seed in any::<u64>(), bit in 0usize..(64 * 8)) {
            let (a, b) = pair(seed);
            let ctx = seed.to_le_bytes();
            let (k, proof) = a.reveal(&b.public(), "b", &ctx, &mut rand_core::OsRng).unwrap();
            prop_assert!(verify(&a.public(), &b.public(), &k, &proof, &ctx, "a").is_ok());
            let mut bytes = proof.to_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            if let Ok(p) = DleqProof::from_bytes(&bytes, "a") {
                prop_assert!(verify(&a.public(), &b.public(), &k, &p, &ctx, "a").is_err());
            }
            let mut k2 = k;
            k2[bit % 32] ^= 1 << (bit % 8);
            prop_assert!(verify(&a.public(), &b.public(), &k2, &proof, &ctx, "a").is_err());
        }
    }
}
