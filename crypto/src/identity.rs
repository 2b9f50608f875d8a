//! Signatures bound to the federation's certificates.
//!
//! A party signs its per-round secure-aggregation keys with the private key
//! of its certificate (ECDSA P-256). Peers verify the signature with the
//! public key of the signer's certificate, after checking that the
//! certificate was issued by the federation CA, is valid now, and names that
//! party. The coordinator relays certificates and keys but cannot forge or
//! substitute either.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, UnparsedPublicKey};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::Error;
use crate::pki::{Role, peer_identity};
use crate::revocation::Revocations;
use crate::secagg::protocol::{IdentitySigner, IdentityVerifier};

fn pem_der(pem: &[u8], what: &str) -> Result<Zeroizing<Vec<u8>>, Error> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| Error::InvalidInput(format!("{what}: not PEM: {e}")))?;
    Ok(Zeroizing::new(block.contents))
}

/// A party's signing key: the private key of its certificate.
pub struct IdentityKey {
    key: EcdsaKeyPair,
    rng: SystemRandom,
}

impl IdentityKey {
    /// Loads a PKCS#8 PEM private key (as written by `confide certs`).
    pub fn from_pem(pem: &[u8]) -> Result<IdentityKey, Error> {
        let der = pem_der(pem, "identity key")?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .map_err(|e| Error::InvalidInput(format!("identity key is not an ECDSA P-256 PKCS#8 key: {e}")))?;
        Ok(IdentityKey { key, rng })
    }
}

impl IdentitySigner for IdentityKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| Error::InvalidInput("signing failed".into()))
    }
}

/// Verifies peers' signatures against their certificates and the CA.
///
/// Keep one per job: a certificate already checked against the CA is only
/// re-checked for its validity period when it comes back in a later round,
/// which saves an ECDSA verification per neighbour and round.
pub struct CertVerifier {
    ca_der: Vec<u8>,
    certs: BTreeMap<String, VerifiedCert>,
    /// Certificates that passed and lapsed since, by party (one each): a
    /// later relay of the same bytes is still a lapse, not a bad
    /// certificate the relay made up.
    lapsed: BTreeMap<String, (Vec<u8>, String)>,
    /// The newest revocation list this side has accepted, shared with its
    /// node so that a list arriving mid-job applies at once.
    revocations: SharedRevocations,
}

/// A revocation list shared between a node and its jobs' verifiers.
pub type SharedRevocations = Arc<RwLock<Revocations>>;

/// A certificate that passed [`CertVerifier::add_peer`].
struct VerifiedCert {
    der: Vec<u8>,
    /// Its serial number, checked against the revocation list at each use.
    serial: Vec<u8>,
    /// Its subject public key, ready for signature checks.
    spki: Vec<u8>,
    /// Its validity period, Unix seconds: re-checked without re-parsing.
    valid: (i64, i64),
}

impl CertVerifier {
    /// A verifier trusting the CA in `ca_pem`.
    pub fn new(ca_pem: &[u8]) -> Result<CertVerifier, Error> {
        Self::with_revocations(ca_pem, Arc::new(RwLock::new(Revocations::empty())))
    }

    /// A verifier trusting the CA in `ca_pem` that refuses the certificates
    /// `revocations` revokes (now or once it is updated).
    pub fn with_revocations(ca_pem: &[u8], revocations: SharedRevocations) -> Result<CertVerifier, Error> {
        let ca_der = pem_der(ca_pem, "CA certificate")?.to_vec();
        X509Certificate::from_der(&ca_der).map_err(|e| Error::Certificate(format!("CA certificate: {e}")))?;
        Ok(CertVerifier { ca_der, certs: BTreeMap::new(), lapsed: BTreeMap::new(), revocations })
    }

    fn revoked(&self, party: &str, serial: &[u8]) -> Result<(), Error> {
        let list = self.revocations.read().unwrap_or_else(|p| p.into_inner());
        if list.is_revoked(serial) {
            return Err(Error::PeerMisbehaved {
                party: party.to_owned(),
                reason: format!("its certificate is revoked (revocation list version {})", list.version()),
            });
        }
        Ok(())
    }

    /// Checks `cert_der` (issued by the CA, valid now, a party certificate
    /// naming `party`) and remembers it for [`IdentityVerifier::verify`].
    pub fn add_peer(&mut self, party: &str, cert_der: &[u8]) -> Result<(), Error> {
        // The same bytes passed every check before: only the validity
        // period can have changed.
        if let Some(c) = self.certs.get(party)
            && c.der == cert_der
        {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let lapsed = if (c.valid.0..=c.valid.1).contains(&now) {
                match self.revoked(party, &c.serial) {
                    Ok(()) => return Ok(()),
                    Err(e) => e.to_string(),
                }
            } else {
                format!("it expired at {} (Unix seconds) after it was checked", c.valid.1)
            };
            // Lapsed since it passed: the peer's standing changed, not the
            // relay's doing (a mid-round expiry made honest parties leave
            // the job blaming the coordinator).
            self.certs.remove(party);
            self.lapsed.insert(party.to_owned(), (cert_der.to_vec(), lapsed.clone()));
            return Err(Error::CertificateLapsed { party: party.to_owned(), reason: lapsed });
        }
        if let Some((der, reason)) = self.lapsed.get(party)
            && der == cert_der
        {
            return Err(Error::CertificateLapsed { party: party.to_owned(), reason: reason.clone() });
        }
        let checked = self.check_peer(party, cert_der);
        match checked {
            Ok(verified) => {
                self.certs.insert(party.to_owned(), verified);
                Ok(())
            }
            Err(e) => {
                // A party that shows a bad certificate loses the good one too.
                self.certs.remove(party);
                Err(e)
            }
        }
    }

    /// The checks of [`Self::add_peer`].
    fn check_peer(&self, party: &str, cert_der: &[u8]) -> Result<VerifiedCert, Error> {
        let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| Error::PeerMisbehaved {
            party: party.into(),
            reason: format!("unparsable certificate: {e}"),
        })?;
        let bad = |reason: String| Error::PeerMisbehaved { party: party.into(), reason };
        if !cert.validity().is_valid() {
            return Err(bad("certificate expired or not yet valid".into()));
        }
        let spki = cert.public_key().subject_public_key.data.to_vec();
        let valid = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
        let (_, ca) = X509Certificate::from_der(&self.ca_der).map_err(|e| Error::Certificate(e.to_string()))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| bad("certificate not issued by the federation CA".into()))?;
        let id = peer_identity(cert_der)?;
        if id.name != party || id.role != Role::Party {
            return Err(bad(format!("certificate names {} ({:?}), not party {party}", id.name, id.role)));
        }
        // The serial of the certificate already parsed (the list normalises it).
        let serial = cert.raw_serial().to_vec();
        self.revoked(party, &serial)?;
        Ok(VerifiedCert { der: cert_der.to_vec(), serial, spki, valid })
    }
}

/// Verifies a statement signed by the holder of `cert_der`: a certificate
/// the federation CA issued, valid now, of `role`, not revoked by
/// `revocations`, whose key signed `msg`. Returns who signed it. For rare,
/// one-off statements (an administrator's deployment), where a
/// [`CertVerifier`]'s cache buys nothing.
pub fn verify_statement(
    ca_pem: &[u8],
    revocations: &Revocations,
    role: Role,
    cert_der: &[u8],
    msg: &[u8],
    sig: &[u8],
) -> Result<crate::pki::PeerIdentity, Error> {
    let ca_der = pem_der(ca_pem, "CA certificate")?;
    let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| Error::Certificate(format!("CA certificate: {e}")))?;
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| Error::Certificate(format!("unparsable certificate: {e}")))?;
    let id = peer_identity(cert_der)?;
    let who = format!("{:?} certificate {}", id.role, id.name);
    if id.role != role {
        return Err(Error::Certificate(format!("a {who} where a {role:?} certificate is needed")));
    }
    if !cert.validity().is_valid() {
        return Err(Error::Certificate(format!("{who} is expired or not yet valid")));
    }
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|_| Error::Certificate(format!("{who} was not issued by the federation CA")))?;
    if revocations.is_revoked(cert.raw_serial()) {
        return Err(Error::Certificate(format!(
            "{who} is revoked (revocation list version {})",
            revocations.version()
        )));
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &cert.public_key().subject_public_key.data)
        .verify(msg, sig)
        .map_err(|_| Error::Certificate(format!("the signature does not verify with the {who}")))?;
    Ok(id)
}

impl IdentityVerifier for CertVerifier {
    fn verify(&self, party: &str, msg: &[u8], sig: &[u8]) -> Result<(), Error> {
        let cert = self
            .certs
            .get(party)
            .ok_or_else(|| Error::PeerMisbehaved { party: party.into(), reason: "no verified certificate".into() })?;
        // Revoked since it was verified: refused from then on.
        self.revoked(party, &cert.serial)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &cert.spki)
            .verify(msg, sig)
            .map_err(|_| Error::PeerMisbehaved { party: party.into(), reason: "signature does not verify".into() })
    }
}

impl crate::aggregation::PeerVerifier for CertVerifier {
    fn add_peer(&mut self, party: &str, certificate: &[u8]) -> Result<(), Error> {
        CertVerifier::add_peer(self, party, certificate)
    }

    fn revocation_version(&self) -> u64 {
        self.revocations.read().unwrap_or_else(|p| p.into_inner()).version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{FederationCa, PkiDir};

    fn der_of(pem: &str) -> Vec<u8> {
        pem_der(pem.as_bytes(), "cert").unwrap().to_vec()
    }

    #[test]
    fn signatures_verify_only_with_the_signers_ca_issued_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into(), "b".into()], &[]).unwrap();
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        let key_a = IdentityKey::from_pem(&std::fs::read(pki.party_key("a")).unwrap()).unwrap();
        let cert_a = der_of(&std::fs::read_to_string(pki.party_cert("a")).unwrap());
        let cert_b = der_of(&std::fs::read_to_string(pki.party_cert("b")).unwrap());
        let mut v = CertVerifier::new(&ca).unwrap();
        v.add_peer("a", &cert_a).unwrap();
        v.add_peer("b", &cert_b).unwrap();
        let sig = key_a.sign(b"keys").unwrap();
        v.verify("a", b"keys", &sig).unwrap();
        assert!(v.verify("a", b"other keys", &sig).is_err());
        assert!(v.verify("b", b"keys", &sig).is_err(), "a's signature passes as b's");
        assert!(v.add_peer("b", &cert_a).is_err(), "a's certificate for b");
        assert!(v.verify("b", b"keys", &key_a.sign(b"keys").unwrap()).is_err(), "b's entry is gone");
        v.add_peer("b", &cert_b).unwrap();
        // The same certificate again (next round) is accepted from the cache.
        v.add_peer("a", &cert_a).unwrap();
        v.verify("a", b"keys", &sig).unwrap();
        // A certificate from another CA is refused.
        let evil = FederationCa::generate("evil").unwrap().issue(Role::Party, "a", &[]).unwrap();
        assert!(v.add_peer("a", &der_of(&evil.cert_pem)).is_err());
        assert!(v.verify("a", b"keys", &sig).is_err(), "a bad certificate drops the verified one");
        v.add_peer("a", &cert_a).unwrap();
        // An expired certificate is refused.
        let now = time::OffsetDateTime::now_utc();
        let expired = pki
            .load_ca()
            .unwrap()
            .issue_with_validity(Role::Party, "a", &[], now - time::Duration::days(3), now - time::Duration::days(1))
            .unwrap();
        assert!(v.add_peer("a", &der_of(&expired.cert_pem)).is_err());
        // A certificate of the federation CA for "a" in another role (a
        // relay's, an administrator's, the coordinator's) is not a party's.
        let ca_issuer = pki.load_ca().unwrap();
        for role in [Role::Relay, Role::Admin, Role::Coordinator] {
            let other = ca_issuer.issue(role, "a", &[]).unwrap();
            let e = v.add_peer("a", &der_of(&other.cert_pem)).unwrap_err().to_string();
            assert!(e.contains("party a misbehaved") && e.contains("not party a"), "{role:?}: {e}");
        }
    }

    #[test]
    fn statements_verify_only_for_their_role_ca_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into()], &[]).unwrap();
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        let admin_key = IdentityKey::from_pem(&std::fs::read(pki.admin_key()).unwrap()).unwrap();
        let admin = der_of(&std::fs::read_to_string(pki.admin_cert()).unwrap());
        let party_key = IdentityKey::from_pem(&std::fs::read(pki.party_key("a")).unwrap()).unwrap();
        let party = der_of(&std::fs::read_to_string(pki.party_cert("a")).unwrap());
        let none = Revocations::empty();
        let sig = admin_key.sign(b"deploy").unwrap();
        let id = verify_statement(&ca, &none, Role::Admin, &admin, b"deploy", &sig).unwrap();
        assert_eq!(id.role, Role::Admin);
        let refused = |role, cert: &[u8], msg: &[u8], sig: &[u8]| {
            verify_statement(&ca, &none, role, cert, msg, sig).unwrap_err().to_string()
        };
        assert!(refused(Role::Admin, &admin, b"deploy!", &sig).contains("does not verify"));
        // A party's signature with its own certificate is not an administrator's.
        let psig = party_key.sign(b"deploy").unwrap();
        assert!(refused(Role::Admin, &party, b"deploy", &psig).contains("Party certificate a"));
        // An administrator of another CA.
        let evil = FederationCa::generate("evil").unwrap().issue(Role::Admin, "admin", &[]).unwrap();
        let evil_key = IdentityKey::from_pem(evil.key_pem.as_bytes()).unwrap();
        let e = refused(Role::Admin, &der_of(&evil.cert_pem), b"deploy", &evil_key.sign(b"deploy").unwrap());
        assert!(e.contains("not issued by the federation CA"), "{e}");
    }

    #[test]
    fn a_revoked_certificate_is_refused_even_once_verified() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into(), "b".into()], &[]).unwrap();
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        let list = Arc::new(RwLock::new(Revocations::empty()));
        let mut v = CertVerifier::with_revocations(&ca, list.clone()).unwrap();
        let cert_a = der_of(&std::fs::read_to_string(pki.party_cert("a")).unwrap());
        let key_a = IdentityKey::from_pem(&std::fs::read(pki.party_key("a")).unwrap()).unwrap();
        v.add_peer("a", &cert_a).unwrap();
        let sig = key_a.sign(b"keys").unwrap();
        v.verify("a", b"keys", &sig).unwrap();
        use crate::aggregation::PeerVerifier;
        assert_eq!(v.revocation_version(), 0);
        // The CA revokes a; the node hands the new list to its verifiers.
        let new = pki.revoke_party("a", None).unwrap();
        assert!(!pki.enrolled().unwrap().contains(&"a".to_string()), "a is de-enrolled");
        list.write().unwrap().update(new).unwrap();
        assert_eq!(v.revocation_version(), 1);
        for err in [v.verify("a", b"keys", &sig).unwrap_err(), v.add_peer("a", &cert_a).unwrap_err()] {
            assert!(err.to_string().contains("revoked"), "{err}");
        }
        // Revoked after it passed: lapsed, the peer's standing (a round
        // refuses it; the relay is not blamed).
        v.add_peer("a", &cert_a).unwrap_err();
        let b = der_of(&std::fs::read_to_string(pki.party_cert("b")).unwrap());
        v.add_peer("b", &b).unwrap();
        list.write().unwrap().update(pki.revoke_party("b", None).unwrap()).unwrap();
        assert!(matches!(v.add_peer("b", &b), Err(Error::CertificateLapsed { party, .. }) if party == "b"));
        assert_eq!(pki.revocations().unwrap().version(), 2);
    }

    /// A certificate that expires between two relays of it (mid-round) is
    /// lapsed, the peer's standing, not a bad certificate the relay made up.
    #[test]
    fn a_certificate_that_expires_after_it_passed_is_lapsed_not_bad() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into()], &[]).unwrap();
        // Valid for three more seconds (the DER keeps whole seconds): time
        // for the first check, then a wait past its end.
        let now = time::OffsetDateTime::now_utc();
        let until = (now + time::Duration::seconds(3)).replace_nanosecond(0).unwrap();
        let short = pki
            .load_ca()
            .unwrap()
            .issue_with_validity(Role::Party, "a", &[], now - time::Duration::hours(1), until)
            .unwrap();
        let mut v = CertVerifier::new(&std::fs::read(pki.ca_cert()).unwrap()).unwrap();
        let cert = der_of(&short.cert_pem);
        v.add_peer("a", &cert).unwrap();
        let wait = until + time::Duration::milliseconds(1100) - time::OffsetDateTime::now_utc();
        std::thread::sleep(std::time::Duration::try_from(wait).unwrap_or_default());
        for _ in 0..2 {
            // Again on the next relay of the same bytes: still a lapse.
            let e = v.add_peer("a", &cert).unwrap_err();
            assert!(
                matches!(&e, Error::CertificateLapsed { party, reason } if party == "a" && reason.contains("expired")),
                "{e}"
            );
        }
    }
}
