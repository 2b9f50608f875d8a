//! Conversions between the secure-aggregation protocol's messages
//! (`confide_crypto::secagg::protocol`) and their protobuf form. Every
//! conversion from the wire checks sizes and names the field at fault.

use confide_crypto::secagg::protocol::{AdvertiseKeys, Config, EncryptedShare, UnmaskRequest, UnmaskShares};
use confide_crypto::secagg::shamir::Share;

use crate::{Error, pb};

fn array<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N], Error> {
    b.try_into().map_err(|_| Error::ProtocolViolation(format!("{what}: {} bytes, expected {N}", b.len())))
}

/// Round parameters to the wire.
pub fn config_to_pb(c: &Config, clip: f32, max_examples: u64) -> pb::SecAggRoundConfig {
    pb::SecAggRoundConfig {
        parties: c.parties.clone(),
        threshold: c.threshold as u32,
        degree: c.degree as u32,
        graph_seed: c.graph_seed.to_vec(),
        bits: c.bits,
        dim: c.dim as u64,
        clip,
        max_examples,
    }
}

/// Round parameters from the wire, for job `job` and round `round`; `max_values`
/// bounds the vector length.
pub fn config_from_pb(
    p: &pb::SecAggRoundConfig,
    job: &str,
    round: u32,
    max_values: usize,
) -> Result<(Config, f32, u64), Error> {
    let dim = usize::try_from(p.dim)
        .ok()
        .filter(|&d| d > 0 && d <= max_values + 1)
        .ok_or_else(|| Error::LimitExceeded(format!("secagg dim {} outside 1..={}", p.dim, max_values + 1)))?;
    let cfg = Config {
        job: job.to_owned(),
        round,
        parties: p.parties.clone(),
        threshold: p.threshold as usize,
        degree: p.degree as usize,
        graph_seed: array(&p.graph_seed, "graph_seed")?,
        bits: p.bits,
        dim,
    };
    Ok((cfg, p.clip, p.max_examples))
}

/// Signed keys (and the signer's certificate) to the wire.
pub fn keys_to_pb(k: &AdvertiseKeys, certificate: &[u8]) -> pb::SecAggPartyKeys {
    pb::SecAggPartyKeys {
        party: k.party.clone(),
        enc_pk: k.enc_pk.to_vec(),
        mask_pk: k.mask_pk.to_vec(),
        signature: k.signature.clone(),
        certificate: certificate.to_vec(),
    }
}

/// Signed keys from the wire, with the certificate.
pub fn keys_from_pb(k: &pb::SecAggPartyKeys) -> Result<(AdvertiseKeys, Vec<u8>), Error> {
    if k.signature.len() > 512 || k.certificate.len() > 16 << 10 {
        return Err(Error::LimitExceeded(format!("keys of {}: signature or certificate too large", k.party)));
    }
    Ok((
        AdvertiseKeys {
            party: k.party.clone(),
            enc_pk: array(&k.enc_pk, "enc_pk")?,
            mask_pk: array(&k.mask_pk, "mask_pk")?,
            signature: k.signature.clone(),
        },
        k.certificate.clone(),
    ))
}

/// Encrypted shares to the wire.
pub fn shares_to_pb(s: &[EncryptedShare]) -> pb::SecAggShares {
    pb::SecAggShares {
        shares: s
            .iter()
            .map(|e| pb::SecAggShare {
                from: e.from.clone(),
                to: e.to.clone(),
                nonce: e.nonce.to_vec(),
                ciphertext: e.ciphertext.clone(),
            })
            .collect(),
    }
}

/// Encrypted shares from the wire (at most `max` of them).
pub fn shares_from_pb(s: &pb::SecAggShares, max: usize) -> Result<Vec<EncryptedShare>, Error> {
    if s.shares.len() > max {
        return Err(Error::LimitExceeded(format!("{} shares; at most {max}", s.shares.len())));
    }
    s.shares
        .iter()
        .map(|e| {
            if e.ciphertext.len() > 1024 {
                return Err(Error::LimitExceeded("share ciphertext too large".into()));
            }
            Ok(EncryptedShare {
                from: e.from.clone(),
                to: e.to.clone(),
                nonce: array(&e.nonce, "nonce")?,
                ciphertext: e.ciphertext.clone(),
            })
        })
        .collect()
}

/// Unmask request to the wire.
pub fn unmask_to_pb(r: &UnmaskRequest) -> pb::SecAggUnmaskRequest {
    pb::SecAggUnmaskRequest { survivors: r.survivors.clone(), dropped: r.dropped.clone() }
}

/// Unmask request from the wire.
pub fn unmask_from_pb(r: &pb::SecAggUnmaskRequest) -> UnmaskRequest {
    UnmaskRequest { survivors: r.survivors.clone(), dropped: r.dropped.clone() }
}

/// Unmask shares to the wire.
pub fn unmask_shares_to_pb(u: &UnmaskShares) -> pb::SecAggUnmaskShares {
    let conv = |v: &[(String, Share)]| {
        v.iter().map(|(o, s)| pb::SecAggOwnerShare { owner: o.clone(), share: s.to_bytes().to_vec() }).collect()
    };
    pb::SecAggUnmaskShares { self_mask: conv(&u.self_mask), mask_key: conv(&u.mask_key) }
}

/// Unmask shares of `party` from the wire (at most `max` of each kind).
pub fn unmask_shares_from_pb(party: &str, u: &pb::SecAggUnmaskShares, max: usize) -> Result<UnmaskShares, Error> {
    if u.self_mask.len() > max || u.mask_key.len() > max {
        return Err(Error::LimitExceeded(format!("more than {max} unmask shares")));
    }
    let conv = |v: &[pb::SecAggOwnerShare]| -> Result<Vec<(String, Share)>, Error> {
        v.iter()
            .map(|o| {
                Share::from_bytes(&o.share)
                    .map(|s| (o.owner.clone(), s))
                    .map_err(|e| Error::ProtocolViolation(format!("share of {}: {e}", o.owner)))
            })
            .collect()
    };
    Ok(UnmaskShares { party: party.to_owned(), self_mask: conv(&u.self_mask)?, mask_key: conv(&u.mask_key)? })
}
