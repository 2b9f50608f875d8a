//! End-to-end encryption of the inputs an edge party forwards to a cloud
//! party through the coordinator (joint inference), and of the answers.
//!
//! The cloud party holds an X25519 key pair and signs its public key, with
//! the service it is for, using its certificate key ([`cloud_key_transcript`]):
//! the edge verifies that signature against the federation CA, so the
//! coordinator that relays the key cannot substitute its own. Each request
//! uses a fresh ephemeral key: HKDF-SHA256 over the Diffie–Hellman secret,
//! both public keys and the caller's context (job, service, request id,
//! sender, recipient) gives two AES-256-GCM keys, one for the request and
//! one for the answer. The request key encrypts the one request its edge
//! sealed (under the fixed nonce). The answer key does not: a coordinator
//! that replays a request gets it answered again (after a new deployment,
//! say) under the same key, so each answer draws a random nonce, sent
//! ahead of its ciphertext. The context is also the associated data, so a
//! ciphertext moved to another request, party or direction fails to open.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::Error;
use crate::secagg::protocol::{IdentitySigner, IdentityVerifier};

/// Domain of a cloud key's signature.
const KEY_DOMAIN: &[u8] = b"confide-cloud-key-v1";
/// Domain of an edge's signature over its sealed request.
const REQUEST_DOMAIN: &[u8] = b"confide-forward-request-v1";
/// HKDF info prefix of a forwarded request's keys.
const KDF_DOMAIN: &[u8] = b"confide-forward-v1";

/// The bytes a cloud party signs to publish `public` as its key for `service`.
pub fn cloud_key_transcript(party: &str, service: &str, public: &[u8; 32], issued_at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    for part in [KEY_DOMAIN, party.as_bytes(), service.as_bytes(), public.as_slice()] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&issued_at.to_le_bytes());
    out
}

/// The bytes an edge party signs to send `sealed` under `context` (which
/// names it, the cloud, both services and the request id): the cloud
/// answers only a request its named sender signed, so neither the
/// coordinator nor anyone else holding the cloud's public key can query
/// the cloud's model under a party's name.
pub fn request_transcript(context: &[u8], sealed: &SealedRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + context.len() + sealed.ciphertext.len());
    for part in [REQUEST_DOMAIN, context, sealed.ephemeral.as_slice(), sealed.ciphertext.as_slice()] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A cloud party's key pair for one service. The secret is wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct CloudSecret {
    // Held as the X25519 type (wiped on drop) and lent by reference, not
    // copied out as bytes for each use (found by review).
    secret: StaticSecret,
}

impl CloudSecret {
    /// A fresh key pair from a cryptographic RNG.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> CloudSecret {
        CloudSecret { secret: StaticSecret::random_from_rng(rng) }
    }

    /// A key pair from its stored secret.
    pub fn from_bytes(secret: &[u8; 32]) -> CloudSecret {
        CloudSecret { secret: StaticSecret::from(*secret) }
    }

    /// The secret, for storing (zeroized when dropped).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret).to_bytes()
    }

    /// Signs the public key for `service` as `party`.
    pub fn sign(
        &self,
        signer: &impl IdentitySigner,
        party: &str,
        service: &str,
        issued_at: u64,
    ) -> Result<Vec<u8>, Error> {
        signer.sign(&cloud_key_transcript(party, service, &self.public(), issued_at))
    }
}

/// Checks that `party` (whose certificate `verifier` has verified) signed
/// `public` as its key for `service`.
pub fn verify_cloud_key(
    verifier: &impl IdentityVerifier,
    party: &str,
    service: &str,
    public: &[u8; 32],
    issued_at: u64,
    signature: &[u8],
) -> Result<(), Error> {
    verifier.verify(party, &cloud_key_transcript(party, service, public, issued_at), signature)
}

/// The key that opens (at the edge) or seals (at the cloud) one request's
/// answer. Consumed by use, wiped on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ReplyKey([u8; 32]);

/// A sealed request: the sender's ephemeral public key and the ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRequest {
    /// The ephemeral X25519 public key.
    pub ephemeral: [u8; 32],
    /// AES-256-GCM ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

fn keys(shared: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32], context: &[u8]) -> Zeroizing<[u8; 64]> {
    let hk = Hkdf::<Sha256>::new(None, shared);
    let mut info = Vec::with_capacity(KDF_DOMAIN.len() + 64 + context.len());
    info.extend_from_slice(KDF_DOMAIN);
    info.extend_from_slice(ephemeral);
    info.extend_from_slice(recipient);
    info.extend_from_slice(context);
    let mut okm = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF-SHA256's limit of 8160.
    let _ = hk.expand(&info, okm.as_mut_slice());
    okm
}

/// The request's nonce: its key (from a fresh ephemeral key) seals that
/// one request.
const REQUEST_NONCE: [u8; 12] = [0; 12];

fn aead(key: &[u8], msg: &[u8], context: &[u8], seal: bool) -> Result<Vec<u8>, Error> {
    aead_with(key, &REQUEST_NONCE, msg, context, seal)
}

fn aead_with(key: &[u8], nonce: &[u8; 12], msg: &[u8], context: &[u8], seal: bool) -> Result<Vec<u8>, Error> {
    let cipher = Aes256Gcm::new_from_slice(key).map_err(|_| Error::InvalidInput("AES-256 key length".into()))?;
    let nonce = Nonce::from_slice(nonce);
    let payload = Payload { msg, aad: context };
    if seal {
        cipher.encrypt(nonce, payload).map_err(|_| Error::InvalidInput("encryption failed".into()))
    } else {
        cipher.decrypt(nonce, payload).map_err(|_| {
            Error::InvalidInput("the ciphertext does not open with this key and context (tampered or misrouted)".into())
        })
    }
}

fn shared_secret(secret: &StaticSecret, public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, Error> {
    let shared = secret.diffie_hellman(&PublicKey::from(*public));
    if !shared.was_contributory() {
        return Err(Error::InvalidInput("a low-order X25519 public key".into()));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// Seals `plaintext` to the cloud key `recipient` under `context`; returns
/// the request and the key that opens its answer.
pub fn seal_request(
    recipient: &[u8; 32],
    context: &[u8],
    plaintext: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(SealedRequest, ReplyKey), Error> {
    seal_request_with(&StaticSecret::random_from_rng(rng), recipient, context, plaintext)
}

fn seal_request_with(
    ephemeral_secret: &StaticSecret,
    recipient: &[u8; 32],
    context: &[u8],
    plaintext: &[u8],
) -> Result<(SealedRequest, ReplyKey), Error> {
    let ephemeral = PublicKey::from(ephemeral_secret).to_bytes();
    let shared = shared_secret(ephemeral_secret, recipient)?;
    let k = keys(&shared, &ephemeral, recipient, context);
    let ciphertext = aead(&k[..32], plaintext, context, true)?;
    // Filled in place: no plain local copy of the key.
    let mut reply = ReplyKey([0u8; 32]);
    reply.0.copy_from_slice(&k[32..]);
    Ok((SealedRequest { ephemeral, ciphertext }, reply))
}

impl CloudSecret {
    /// Opens a request sealed to this key under `context`; returns the
    /// plaintext and the key to seal its answer with.
    pub fn open_request(&self, context: &[u8], sealed: &SealedRequest) -> Result<(Vec<u8>, ReplyKey), Error> {
        let public = self.public();
        let shared = shared_secret(&self.secret, &sealed.ephemeral)?;
        let k = keys(&shared, &sealed.ephemeral, &public, context);
        let plaintext = aead(&k[..32], &sealed.ciphertext, context, false)?;
        let mut reply = ReplyKey([0u8; 32]);
        reply.0.copy_from_slice(&k[32..]);
        Ok((plaintext, reply))
    }
}

impl ReplyKey {
    /// Seals the answer (at the cloud party): a random nonce, then the
    /// AES-256-GCM ciphertext and tag. The same request opened twice (a
    /// replay) gives the same key, so the nonce is drawn, never fixed.
    pub fn seal(self, context: &[u8], answer: &[u8]) -> Result<Vec<u8>, Error> {
        let mut nonce = [0u8; 12];
        rand_core::OsRng.fill_bytes(&mut nonce);
        self.seal_with(&nonce, context, answer)
    }

    fn seal_with(self, nonce: &[u8; 12], context: &[u8], answer: &[u8]) -> Result<Vec<u8>, Error> {
        let sealed = aead_with(&self.0, nonce, answer, context, true)?;
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens the answer (at the edge party).
    pub fn open(self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let (nonce, ciphertext) = sealed.split_first_chunk::<12>().ok_or_else(|| {
            Error::InvalidInput(format!("an answer of {} bytes: shorter than its nonce", sealed.len()))
        })?;
        aead_with(&self.0, nonce, ciphertext, context, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Known answer, computed independently with Python's `cryptography`
    /// (X25519, HKDF-SHA256, AES-GCM): see `scripts/sealed_reference.py`.
    #[test]
    fn known_answer_matches_an_independent_implementation() {
        let recipient = CloudSecret::from_bytes(&[7u8; 32]);
        let (req, reply) = seal_request_with(
            &StaticSecret::from([9u8; 32]),
            &recipient.public(),
            b"job-1/triage/42/site-0/cloud-0",
            b"rows",
        )
        .unwrap();
        let answer = reply.seal_with(&[5u8; 12], b"job-1/triage/42/site-0/cloud-0", b"probs").unwrap();
        let expected: serde_json::Value =
            serde_json::from_str(include_str!("../../scripts/sealed_reference.json")).unwrap();
        assert_eq!(hex(&recipient.public()), expected["recipient_public"]);
        assert_eq!(hex(&req.ephemeral), expected["ephemeral_public"]);
        assert_eq!(hex(&req.ciphertext), expected["request_ciphertext"]);
        assert_eq!(hex(&answer), expected["answer_ciphertext"]);
    }

    #[test]
    fn a_cloud_key_verifies_only_for_its_party_service_and_bytes() {
        use crate::secagg::testing::{InsecureTagSigner, InsecureTagVerifier};
        let k = CloudSecret::generate(&mut rand_core::OsRng);
        let sig = k.sign(&InsecureTagSigner("cloud-0".into()), "cloud-0", "digits", 5).unwrap();
        let v = InsecureTagVerifier;
        verify_cloud_key(&v, "cloud-0", "digits", &k.public(), 5, &sig).unwrap();
        assert!(verify_cloud_key(&v, "cloud-0", "other", &k.public(), 5, &sig).is_err());
        assert!(verify_cloud_key(&v, "cloud-0", "digits", &k.public(), 6, &sig).is_err());
        assert!(verify_cloud_key(&v, "cloud-0", "digits", &[1; 32], 5, &sig).is_err());
    }

    /// A request opened twice (the coordinator replays it, and the cloud
    /// answers again, from another model say) gives the same answer key;
    /// the two answers still use different nonces, so their ciphertexts
    /// XOR to nothing of the answers' XOR, and each opens at the edge.
    #[test]
    fn a_replayed_request_is_answered_under_a_fresh_nonce() {
        let cloud = CloudSecret::generate(&mut rand_core::OsRng);
        let (req, _) = seal_request_with(&StaticSecret::from([3u8; 32]), &cloud.public(), b"ctx", b"rows").unwrap();
        let (first, second) = (b"{\"p\":[0.91]}".as_slice(), b"{\"p\":[0.12]}".as_slice());
        let a1 = cloud.open_request(b"ctx", &req).unwrap().1.seal(b"ctx", first).unwrap();
        let a2 = cloud.open_request(b"ctx", &req).unwrap().1.seal(b"ctx", second).unwrap();
        assert_ne!(a1[..12], a2[..12], "a nonce per answer");
        let xor = |a: &[u8], b: &[u8]| a.iter().zip(b).map(|(x, y)| x ^ y).collect::<Vec<u8>>();
        assert_ne!(xor(&a1[12..12 + first.len()], &a2[12..12 + second.len()]), xor(first, second));
        let edge_key =
            || seal_request_with(&StaticSecret::from([3u8; 32]), &cloud.public(), b"ctx", b"rows").unwrap().1;
        assert_eq!(edge_key().open(b"ctx", &a1).unwrap(), first);
        assert_eq!(edge_key().open(b"ctx", &a2).unwrap(), second);
        assert!(edge_key().open(b"ctx", &a1[..11]).is_err(), "shorter than a nonce");
    }

    #[test]
    fn low_order_keys_are_refused() {
        let r = seal_request(&[0u8; 32], b"c", b"x", &mut rand_core::OsRng);
        assert!(r.is_err());
        let k = CloudSecret::generate(&mut rand_core::OsRng);
        let bad = SealedRequest { ephemeral: [0; 32], ciphertext: vec![0; 20] };
        assert!(k.open_request(b"c", &bad).is_err());
    }

    proptest! {
        #[test]
        fn requests_and_answers_open_only_with_their_key_and_context(
            msg in proptest::collection::vec(any::<u8>(), 0..300),
            answer in proptest::collection::vec(any::<u8>(), 0..100),
            flip in any::<prop::sample::Index>(),
        ) {
            let cloud = CloudSecret::generate(&mut rand_core::OsRng);
            let other = CloudSecret::generate(&mut rand_core::OsRng);
            let (req, edge_key) = seal_request(&cloud.public(), b"ctx-1", &msg, &mut rand_core::OsRng).unwrap();
            let (got, cloud_key) = cloud.open_request(b"ctx-1", &req).unwrap();
            prop_assert_eq!(&got, &msg);
            // Another key, another context, or one flipped bit: refused.
            prop_assert!(other.open_request(b"ctx-1", &req).is_err());
            prop_assert!(cloud.open_request(b"ctx-2", &req).is_err());
            let mut t = req.clone();
            let i = flip.index(t.ciphertext.len());
            t.ciphertext[i] ^= 1;
            prop_assert!(cloud.open_request(b"ctx-1", &t).is_err());
            let sealed = cloud_key.seal(b"ctx-1", &answer).unwrap();
            prop_assert!(sealed != answer || answer.is_empty());
            // The request's key does not open the answer as a request, and
            // the answer opens at the edge only.
            let as_request = SealedRequest { ephemeral: req.ephemeral, ciphertext: sealed.clone() };
            prop_assert!(cloud.open_request(b"ctx-1", &as_request).is_err());
            prop_assert_eq!(edge_key.open(b"ctx-1", &sealed).unwrap(), answer);
        }
    }
}
