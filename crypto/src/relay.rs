//! Relay delegations: a party's signed statement that one named relay may
//! carry its stream to the coordinator.
//!
//! A relay terminates the party's TLS connection, so the coordinator cannot
//! read the party's name off a client certificate. Instead the party signs
//! (with its certificate key) the relay's name, as it read it off the
//! relay's verified server certificate, and the time. The coordinator
//! accepts a stream a relay opens for a party only with such a signature,
//! made for that relay, within [`MAX_CLOCK_SKEW_SECS`] of its own clock, and
//! only once (each carries a fresh nonce the coordinator remembers): a relay
//! cannot speak for parties that do not dial it, another relay cannot reuse
//! a delegation, and the same relay cannot replay one for a second stream.

use crate::Error;
use crate::identity::CertVerifier;
use crate::pki::{Role, peer_identity};
use crate::secagg::protocol::{IdentitySigner, IdentityVerifier};

/// How far a delegation's time may be from the coordinator's clock.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;

/// Bytes of a delegation's nonce.
pub const NONCE_BYTES: usize = 16;

/// The bytes a party signs to delegate its stream to `relay` at `unix_secs`.
pub fn delegation_transcript(party: &str, relay: &str, unix_secs: u64, nonce: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [b"confide-relay-delegation-v2".as_slice(), party.as_bytes(), relay.as_bytes(), nonce] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&unix_secs.to_le_bytes());
    out
}

/// The party's signature delegating its stream to `relay`, and its nonce.
pub fn sign_delegation(
    signer: &impl IdentitySigner,
    party: &str,
    relay: &str,
    unix_secs: u64,
) -> Result<(Vec<u8>, [u8; NONCE_BYTES]), Error> {
    let mut nonce = [0u8; NONCE_BYTES];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    Ok((signer.sign(&delegation_transcript(party, relay, unix_secs, &nonce))?, nonce))
}

/// Checks a delegation the relay named `relay` presents: `party_cert` is a
/// party certificate of the federation (not revoked), `signature` is its
/// holder's over this relay and `unix_secs`, and `unix_secs` is within
/// [`MAX_CLOCK_SKEW_SECS`] of `now`. Returns the party's name. (Whether the
/// nonce was used before is the caller's to check, durably: the
/// coordinator keeps the nonces of the last 2 × [`MAX_CLOCK_SKEW_SECS`] in
/// its database.)
pub fn check_delegation(
    verifier: &mut CertVerifier,
    party_cert: &[u8],
    relay: &str,
    unix_secs: u64,
    nonce: &[u8],
    signature: &[u8],
    now: u64,
) -> Result<String, Error> {
    if nonce.len() != NONCE_BYTES {
        return Err(Error::PeerMisbehaved {
            party: relay.to_owned(),
            reason: format!("presented a delegation nonce of {} bytes, not {NONCE_BYTES}", nonce.len()),
        });
    }
    let id = peer_identity(party_cert)?;
    if id.role != Role::Party {
        return Err(Error::InvalidInput(format!(
            "relay {relay} presented a {:?} certificate ({}) as a party's",
            id.role, id.name
        )));
    }
    let party = id.name;
    verifier.add_peer(&party, party_cert)?;
    verifier.verify(&party, &delegation_transcript(&party, relay, unix_secs, nonce), signature).map_err(|_| {
        Error::PeerMisbehaved {
            party: relay.to_owned(),
            reason: format!("presented a delegation that {party} did not sign for this relay"),
        }
    })?;
    if unix_secs.abs_diff(now) > MAX_CLOCK_SKEW_SECS {
        return Err(Error::PeerMisbehaved {
            party: relay.to_owned(),
            reason: format!(
                "presented a delegation of {party} made {}s from now (at most {MAX_CLOCK_SKEW_SECS}s)",
                unix_secs.abs_diff(now)
            ),
        });
    }
    Ok(party)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKey;
    use crate::pki::{FederationCa, Role};

    fn setup() -> (CertVerifier, IdentityKey, Vec<u8>, FederationCa) {
        let ca = FederationCa::generate("test").unwrap();
        let issued = ca.issue(Role::Party, "site-1", &[]).unwrap();
        let key = IdentityKey::from_pem(issued.key_pem.as_bytes()).unwrap();
        let der = x509_parser::pem::parse_x509_pem(issued.cert_pem.as_bytes()).unwrap().1.contents;
        (CertVerifier::new(ca.cert_pem().as_bytes()).unwrap(), key, der, ca)
    }

    #[test]
    fn a_delegation_holds_for_its_relay_and_time_only() {
        let (mut v, key, cert, ca) = setup();
        let (sig, nonce) = sign_delegation(&key, "site-1", "edge-a", 1000).unwrap();
        assert_eq!(check_delegation(&mut v, &cert, "edge-a", 1000, &nonce, &sig, 1100).unwrap(), "site-1");
        // Another relay cannot reuse it.
        let e = check_delegation(&mut v, &cert, "edge-b", 1000, &nonce, &sig, 1100).unwrap_err().to_string();
        assert!(e.contains("edge-b") && e.contains("did not sign"), "{e}");
        // Nor can a later time or another nonce be claimed for it.
        assert!(check_delegation(&mut v, &cert, "edge-a", 1001, &nonce, &sig, 1100).is_err());
        assert!(check_delegation(&mut v, &cert, "edge-a", 1000, &[0; NONCE_BYTES], &sig, 1100).is_err());
        assert!(check_delegation(&mut v, &cert, "edge-a", 1000, &nonce[..8], &sig, 1100).is_err());
        // Stale.
        let e = check_delegation(&mut v, &cert, "edge-a", 1000, &nonce, &sig, 1000 + MAX_CLOCK_SKEW_SECS + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("edge-a") && e.contains("from now"), "{e}");
        // A relay certificate is not a party's.
        let relay = ca.issue(Role::Relay, "edge-a", &[]).unwrap();
        let relay_der = x509_parser::pem::parse_x509_pem(relay.cert_pem.as_bytes()).unwrap().1.contents;
        assert!(check_delegation(&mut v, &relay_der, "edge-a", 1000, &nonce, &sig, 1000).is_err());
        // A certificate of another CA.
        let (_, other_key, other_cert, _) = setup();
        let (sig, nonce) = sign_delegation(&other_key, "site-1", "edge-a", 1000).unwrap();
        assert!(check_delegation(&mut v, &other_cert, "edge-a", 1000, &nonce, &sig, 1000).is_err());
    }
}
