//! An insecure stand-in for certificate signatures, for tests and
//! protocol-only benchmarks (feature `testing`): a SHA-256 tag anyone can
//! compute. Nothing in the party or coordinator uses it.

use sha2::{Digest, Sha256};

use super::protocol::{IdentitySigner, IdentityVerifier};
use crate::Error;

/// Signs as `self.0` with a hash tag.
pub struct InsecureTagSigner(pub String);

/// Accepts exactly the tags of [`InsecureTagSigner`].
pub struct InsecureTagVerifier;

/// [`InsecureTagVerifier`] claiming a revocation list of this version.
pub struct VersionedTagVerifier(pub u64);

impl IdentityVerifier for VersionedTagVerifier {
    fn verify(&self, party: &str, msg: &[u8], sig: &[u8]) -> Result<(), Error> {
        InsecureTagVerifier.verify(party, msg, sig)
    }
}

impl crate::aggregation::PeerVerifier for VersionedTagVerifier {
    fn add_peer(&mut self, _: &str, _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
    fn revocation_version(&self) -> u64 {
        self.0
    }
}

fn tag(party: &str, msg: &[u8]) -> Vec<u8> {
    Sha256::new().chain_update(party.as_bytes()).chain_update([0]).chain_update(msg).finalize().to_vec()
}

impl IdentitySigner for InsecureTagSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        Ok(tag(&self.0, msg))
    }
}

impl IdentityVerifier for InsecureTagVerifier {
    fn verify(&self, party: &str, msg: &[u8], sig: &[u8]) -> Result<(), Error> {
        if tag(party, msg) == sig { Ok(()) } else { Err(Error::InvalidInput("signature mismatch".into())) }
    }
}

impl crate::aggregation::PeerVerifier for InsecureTagVerifier {
    fn add_peer(&mut self, _: &str, _: &[u8]) -> Result<(), Error> {
        Ok(())
    }
}

/// A party identity signing and verifying with hash tags.
pub fn identity(name: &str) -> crate::aggregation::PartyIdentity {
    crate::aggregation::PartyIdentity {
        name: name.to_owned(),
        signer: std::sync::Arc::new(InsecureTagSigner(name.to_owned())),
        peers: Box::new(InsecureTagVerifier),
        released: Default::default(),
    }
}

/// The consistency and unmask stages with hash-tag signatures: every client
/// in `answer` (each sent its masked input) signs the survivor set and
/// answers its unmask request; the server is then ready to `finish`.
pub fn consistency_and_unmask<'a>(
    server: &mut super::protocol::Server,
    answer: impl IntoIterator<Item = &'a mut super::protocol::Client>,
) -> Result<(), Error> {
    let survivors = server.close_masked()?;
    let mut clients: std::collections::BTreeMap<String, &mut super::protocol::Client> =
        answer.into_iter().map(|c| (c.name().to_owned(), c)).collect();
    for (p, c) in clients.iter_mut() {
        server
            .on_survivor_signature(c.on_survivors(&survivors, &InsecureTagSigner(p.clone()))?, &InsecureTagVerifier)?;
    }
    for (p, req) in server.close_consistency()? {
        if let Some(c) = clients.get_mut(&p) {
            server.on_unmask(c.on_unmask(&req, &InsecureTagVerifier)?)?;
        }
    }
    Ok(())
}
