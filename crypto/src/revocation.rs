//! Certificate revocation: the federation CA's signed, versioned list of
//! revoked certificates, as a standard X.509 CRL whose CRL number is its
//! version.
//!
//! `confide certs revoke NAME` (on the CA's machine) adds the party's
//! certificate (`--coordinator`: the coordinator's) and writes
//! `revoked.crl.pem`; the coordinator, given the file,
//! refuses the certificate at the TLS handshake, closes the party's open
//! streams and sends the list to every party. A party accepts a list only if
//! the CA signed it and its version is not older than the newest it has seen
//! (kept on disk across restarts), checks it for the coordinator's
//! certificate and every peer's whose round keys it verifies, and requires
//! each secure round to be bound to the same version, so parties with
//! different lists cannot complete a round together.

use std::collections::BTreeSet;

use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::Error;
use crate::pki::{FederationCa, pem_or_der};

/// Where a PKI directory keeps its revocation list.
pub const CRL_FILE: &str = "revoked.crl.pem";

/// Most entries a list may hold (a boundary check on what is parsed).
pub const MAX_REVOKED: usize = 100_000;

/// A verified revocation list: its version and the revoked serial numbers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Revocations {
    version: u64,
    /// Serial numbers, big-endian without leading zeros.
    serials: BTreeSet<Vec<u8>>,
    /// The list as the CA signed it (DER); empty for version 0, the empty
    /// list every federation starts with.
    der: Vec<u8>,
}

/// A serial number without leading zero bytes (as DER may pad one).
fn normalise(serial: &[u8]) -> Vec<u8> {
    let start = serial.iter().position(|b| *b != 0).unwrap_or(serial.len());
    serial[start..].to_vec()
}

impl Revocations {
    /// The empty list (version 0), before any revocation.
    pub fn empty() -> Self {
        Revocations::default()
    }

    /// Parses and verifies a list (PEM or DER) against the federation CA
    /// (`ca_pem`); `source` names it in errors.
    pub fn parse(bytes: &[u8], ca_pem: &[u8], source: &str) -> Result<Self, Error> {
        let bad = |why: String| Error::Certificate(format!("{source}: {why}"));
        let der = pem_or_der(bytes, source)?;
        let (_, crl) =
            CertificateRevocationList::from_der(&der).map_err(|e| bad(format!("not a revocation list: {e}")))?;
        let ca_der = pem_or_der(ca_pem, "CA certificate")?;
        let (_, ca) = X509Certificate::from_der(&ca_der).map_err(|e| Error::Certificate(format!("CA: {e}")))?;
        if crl.issuer() != ca.subject() {
            return Err(bad("not issued by the federation CA".into()));
        }
        crl.verify_signature(ca.public_key()).map_err(|_| bad("its signature is not the federation CA's".into()))?;
        let version = crl
            .crl_number()
            .and_then(|n| u64::try_from(n.clone()).ok())
            .ok_or_else(|| bad("no CRL number (its version)".into()))?;
        let mut serials = BTreeSet::new();
        for r in crl.iter_revoked_certificates() {
            if serials.len() >= MAX_REVOKED {
                return Err(bad(format!("more than {MAX_REVOKED} entries")));
            }
            serials.insert(normalise(r.raw_serial()));
        }
        Ok(Revocations { version, serials, der })
    }

    /// The list's version (its CRL number; 0 for the empty list).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many certificates it revokes.
    pub fn len(&self) -> usize {
        self.serials.len()
    }

    /// Whether it revokes nothing.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty()
    }

    /// The list as signed (DER); empty for version 0.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The list as PEM.
    pub fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("X509 CRL", self.der.clone()))
    }

    /// Whether the certificate with this serial number is revoked.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.serials.contains(&normalise(serial))
    }

    /// Refuses `cert_der` if the list revokes it; `who` names its holder.
    pub fn check(&self, who: &str, cert_der: &[u8]) -> Result<(), Error> {
        if self.serials.is_empty() {
            return Ok(());
        }
        let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| Error::PeerMisbehaved {
            party: who.to_owned(),
            reason: format!("unparsable certificate: {e}"),
        })?;
        if self.is_revoked(cert.raw_serial()) {
            return Err(Error::PeerMisbehaved {
                party: who.to_owned(),
                reason: format!("its certificate is revoked (revocation list version {})", self.version),
            });
        }
        Ok(())
    }

    /// Accepts `newer` in place of this list: it must not be older.
    pub fn update(&mut self, newer: Revocations) -> Result<bool, Error> {
        if newer.version < self.version {
            return Err(Error::InvalidInput(format!(
                "revocation list version {} is older than version {}, already seen",
                newer.version, self.version
            )));
        }
        if newer.version == self.version {
            if newer.serials != self.serials {
                return Err(Error::InvalidInput(format!(
                    "two different revocation lists carry version {}",
                    self.version
                )));
            }
            return Ok(false);
        }
        *self = newer;
        Ok(true)
    }
}

/// The serial number of a certificate (PEM or DER).
pub fn certificate_serial(cert: &[u8]) -> Result<Vec<u8>, Error> {
    let der = pem_or_der(cert, "certificate")?;
    let (_, c) = X509Certificate::from_der(&der).map_err(|e| Error::Certificate(e.to_string()))?;
    Ok(normalise(c.raw_serial()))
}

impl FederationCa {
    /// A list revoking `previous`'s certificates and `serial`, one version
    /// newer, signed by this CA and valid for a year.
    pub fn revoke(&self, previous: &Revocations, serial: &[u8]) -> Result<Revocations, Error> {
        let now = OffsetDateTime::now_utc();
        let mut serials = previous.serials.clone();
        serials.insert(normalise(serial));
        let revoked_certs = serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(365),
            crl_number: rcgen::SerialNumber::from(previous.version + 1),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        Revocations::parse(crl.der(), self.cert_pem().as_bytes(), "the new revocation list")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Role;

    #[test]
    fn a_revocation_list_is_versioned_signed_and_checked() {
        let ca = FederationCa::generate("t").unwrap();
        let a = ca.issue(Role::Party, "a", &[]).unwrap();
        let b = ca.issue(Role::Party, "b", &[]).unwrap();
        let der = |pem: &str| x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        let v1 = ca.revoke(&Revocations::empty(), &certificate_serial(a.cert_pem.as_bytes()).unwrap()).unwrap();
        assert_eq!((v1.version(), v1.len()), (1, 1));
        let err = v1.check("a", &der(&a.cert_pem)).unwrap_err().to_string();
        assert!(err.contains("party a") && err.contains("revoked"), "{err}");
        v1.check("b", &der(&b.cert_pem)).unwrap();
        // It survives PEM and DER, and verifies only against its CA.
        let ca_pem = ca.cert_pem().as_bytes();
        assert_eq!(Revocations::parse(v1.pem().as_bytes(), ca_pem, "crl").unwrap(), v1);
        assert_eq!(Revocations::parse(v1.der(), ca_pem, "crl").unwrap(), v1);
        let other = FederationCa::generate("evil").unwrap();
        let err = Revocations::parse(v1.der(), other.cert_pem().as_bytes(), "crl").unwrap_err().to_string();
        assert!(err.contains("federation CA"), "{err}");
        let forged = other.revoke(&Revocations::empty(), &[1]).unwrap();
        assert!(Revocations::parse(forged.der(), ca_pem, "crl").is_err(), "another CA's list");
        let mut tampered = v1.der().to_vec();
        let last = tampered.len() - 3;
        tampered[last] ^= 1;
        assert!(Revocations::parse(&tampered, ca_pem, "crl").is_err(), "a flipped bit");
        // Versions only go forward.
        let v2 = ca.revoke(&v1, &certificate_serial(b.cert_pem.as_bytes()).unwrap()).unwrap();
        assert_eq!((v2.version(), v2.len()), (2, 2));
        let mut seen = v2.clone();
        let err = seen.update(v1.clone()).unwrap_err().to_string();
        assert!(err.contains("older"), "{err}");
        assert!(!seen.update(v2.clone()).unwrap(), "the same list again changes nothing");
        let mut seen = Revocations::empty();
        assert!(seen.update(v1).unwrap());
        assert_eq!(seen.version(), 1);
    }
}
