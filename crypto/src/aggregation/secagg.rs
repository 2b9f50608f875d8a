//! `secagg`: SecAgg+ ([`crate::secagg::protocol`]) as an aggregation
//! protocol. The coordinator learns only the example-weighted sum of the
//! surviving parties' updates.
//!
//! ```text
//!  fit                  round config (parties, threshold, degree, graph seed, bits, dim, clip, max_examples)
//!                       → each party trains, encodes its update, answers with signed round keys
//!  secagg-shares        neighbours' keys + certificates → encrypted Shamir shares
//!  secagg-masked-input  shares addressed to the party → masked vector (bulk words)
//!  secagg-consistency   the survivor set → the party's signature on it
//!  secagg-unmask        the survivor set and its signatures (with the signers' certificates)
//!                       → the shares that remove the masks
//! ```
//! A party takes nothing about the round on trust that it can derive: the
//! threshold, degree, graph seed, bits, clip and `max_examples` follow from
//! the spec it accepted; the party list must be parties the spec names, and
//! at least 3 and the job's (and the party's own) minimum. A digest of all of
//! it, with the global model and the fit configuration, is bound into every
//! signature, so parties shown different rounds cannot complete one.
//! Messages are this module's own prost types; the session layer carries
//! them as opaque [`Envelope`]s.

use std::collections::BTreeMap;

use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::sum::{SumLayout, WideSum};
use super::update::{NoisePool, NoisyUpdate, WeightedUpdate};
use super::{
    AggregationClient, AggregationProtocol, AggregationServer, Bulk, Decoding, Envelope, JobFacts, LocalUpdate,
    Messages, PartyIdentity, Peer, PeerVerifier, Problem, Progress, Quorum, Reveals, RoundInfo, StageName, SumRound,
    parse_settings,
};
use crate::Error;
use crate::dleq::DleqProof;
use crate::secagg::params::{self, ThreatModel};
use crate::secagg::protocol::{
    AdvertiseKeys, Client, Config, EncryptedShare, IdentityVerifier, MaskedInput, Sealed, Server, ShareComplaint,
    ShareTree, SurvivorSignature, UnmaskRequest, UnmaskShares, share_tree_root_from,
};
use crate::secagg::shamir::Share;
use confide_algorithms::FitConfig;
use confide_dp::ddg::{Ddg, DdgNoise};

/// Parties exchange encrypted key shares.
pub const SHARES: StageName = StageName::new("secagg-shares");
/// Parties send masked inputs.
pub const MASKED_INPUT: StageName = StageName::new("secagg-masked-input");
/// Parties sign the survivor set.
pub const CONSISTENCY: StageName = StageName::new("secagg-consistency");
/// Parties reveal the shares that remove the masks.
pub const UNMASK: StageName = StageName::new("secagg-unmask");

/// Fewest parties in a secure round: with two, each learns the other's
/// update from the sum.
pub const MIN_ROUND_PARTIES: usize = 3;

/// The SecAgg+ protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct SecAggPlus;

/// `[aggregation.secagg]` of a job spec.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecAggSettings {
    /// γ: the fraction of a round's parties that may be corrupt and collude
    /// with the coordinator, in [0, 1/3). The degree and threshold follow.
    pub corrupt_fraction: f64,
    /// δ: the fraction of a round's parties that may drop out, in [0, 0.5).
    pub dropout_fraction: f64,
    /// No longer set directly (it follows from the two fractions); present
    /// only so that an old spec setting it gets a clear error.
    #[serde(skip_serializing)]
    pub threshold: Option<f64>,
    /// Bits of the modulus the encoded sum lives in, 16..=32.
    pub bits: u32,
    /// Each coordinate of a party's (example-weighted) update is clipped to [-clip, clip].
    pub clip: f32,
    /// The most training examples one party may weigh in with; its update
    /// is scaled by n/max_examples before encoding.
    pub max_examples: u64,
}

impl Default for SecAggSettings {
    fn default() -> Self {
        SecAggSettings {
            corrupt_fraction: 0.05,
            dropout_fraction: 0.1,
            threshold: None,
            bits: 32,
            clip: 1.0,
            max_examples: 100_000,
        }
    }
}

impl SecAggSettings {
    /// The threat model the settings state.
    pub fn threat_model(&self) -> ThreatModel {
        ThreatModel { corrupt_fraction: self.corrupt_fraction, dropout_fraction: self.dropout_fraction }
    }

    /// The settings in `table` with defaults filled in; errors name the field.
    pub fn from_table(table: &toml::Table) -> Result<Self, Vec<Problem>> {
        parse_settings(table)
    }

    fn check(&self, job: &JobFacts) -> Vec<Problem> {
        let mut p = Vec::new();
        if self.threshold.is_some() {
            p.push(Problem::setting(
                "threshold",
                "is no longer set directly: it follows from corrupt_fraction and dropout_fraction \
                 (see docs/secure-aggregation.md); remove it",
            ));
        }
        let tm = self.threat_model();
        if let Err(e) = params::check(&tm) {
            let field = if e.starts_with("dropout") { "dropout_fraction" } else { "corrupt_fraction" };
            p.push(Problem::setting(field, e));
        } else {
            // Every round the job allows must have parameters: with the
            // federation's colluders counted in each, a round between the
            // smallest and the largest can fail where both pass.
            let fc = federation_corrupt(job, &tm);
            // Named for what makes it impossible: the colluders alone, or
            // only with the dropouts. One problem per cause, for the
            // smallest size, naming every size that fails.
            let without_dropouts = params::ThreatModel { dropout_fraction: 0.0, ..tm };
            let mut failing: BTreeMap<&str, (String, Vec<usize>)> = BTreeMap::new();
            for n in checked_round_sizes(job) {
                if let Err(e) = params::choose_in(n, &tm, fc) {
                    let field = if params::choose_in(n, &without_dropouts, fc).is_err() {
                        "corrupt_fraction"
                    } else {
                        "dropout_fraction"
                    };
                    failing.entry(field).or_insert_with(|| (e.to_string(), Vec::new())).1.push(n);
                }
            }
            for (field, (first, sizes)) in failing {
                let message = if sizes.len() == 1 {
                    first
                } else {
                    let rest: Vec<String> = sizes[1..].iter().map(usize::to_string).collect();
                    format!("{first}; so do rounds of {} parties", rest.join(", "))
                };
                p.push(Problem::setting(field, message));
            }
        }
        if !(16..=32).contains(&self.bits) {
            p.push(Problem::setting("bits", format!("must be 16..=32 (got {})", self.bits)));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            p.push(Problem::setting("clip", format!("must be positive and finite (got {})", self.clip)));
        }
        let parties = job.party_bound();
        let bits = self.bits.min(32);
        if self.max_examples == 0 || (self.max_examples as u128) * (parties as u128) >= 1u128 << bits {
            p.push(Problem::setting(
                "max_examples",
                format!("must be positive and {parties} × max_examples must fit in {} bits", self.bits),
            ));
        } else if (((1u64 << bits) - 1) / parties as u64) < 256 {
            p.push(Problem::setting("bits", format!("{} bits are too few for {parties} parties", self.bits)));
        }
        if job.min_parties < MIN_ROUND_PARTIES {
            p.push(Problem::spec(
                "parties.min",
                format!(
                    "secure aggregation needs at least {MIN_ROUND_PARTIES} parties (with 2, each learns the other's update from the sum)"
                ),
            ));
        }
        p
    }
}

/// The round sizes validation checks: every size the job allows, from its
/// smallest to its largest (with the federation's colluders fixed,
/// feasibility is not monotone in the size), at most
/// [`MAX_CHECKED_ROUND_SIZES`] of them; past that, the smallest ones, every
/// size up to the complete graph's limit, and the largest.
fn checked_round_sizes(job: &JobFacts) -> Vec<usize> {
    let largest = job.party_bound();
    let smallest = job.min_parties.max(MIN_ROUND_PARTIES).min(largest);
    let mut sizes: Vec<usize> = if largest - smallest < MAX_CHECKED_ROUND_SIZES {
        (smallest..=largest).collect()
    } else {
        let mut s: Vec<usize> = (smallest..smallest + MAX_CHECKED_ROUND_SIZES).collect();
        s.extend(smallest.max(MIN_ROUND_PARTIES)..=params::COMPLETE_UP_TO);
        s.push(largest);
        s.sort_unstable();
        s.dedup();
        s
    };
    sizes.retain(|&n| n >= MIN_ROUND_PARTIES);
    sizes
}

/// The most round sizes [`checked_round_sizes`] takes (each a parameter
/// search, at every party's validation of the spec).
const MAX_CHECKED_ROUND_SIZES: usize = 256;

/// The parties of the whole federation that may collude with the
/// coordinator, ⌊γN⌋ of the N parties the spec names: every round counts
/// them (the coordinator forms the rounds, so it can put them all in a
/// small one), as the distributed DP noise does. A spec that names no
/// parties leaves membership to enrolment, with no N to count from: each
/// round then counts ⌊γn⌋ of its own n (docs/secure-aggregation.md says
/// what that leaves out).
fn federation_corrupt(job: &JobFacts, tm: &params::ThreatModel) -> usize {
    if job.party_names.is_empty() { 0 } else { params::corrupt_parties(job.party_names.len(), tm) }
}

/// The largest round a job can have and, when smaller, the smallest it
/// allows: the sizes whose parameters validation checks and `explain` shows.
fn round_sizes(job: &JobFacts) -> Vec<usize> {
    let largest = job.party_bound();
    let mut sizes = vec![largest];
    if job.min_parties < largest {
        sizes.push(job.min_parties);
    }
    sizes.retain(|&n| n >= MIN_ROUND_PARTIES);
    sizes
}

impl AggregationProtocol for SecAggPlus {
    fn name(&self) -> &'static str {
        "secagg"
    }

    fn describe(&self) -> &'static str {
        "SecAgg+ secure aggregation; the coordinator learns only the example-weighted sum of the updates"
    }

    fn stages(&self) -> &'static [StageName] {
        &[SHARES, MASKED_INPUT, CONSISTENCY, UNMASK]
    }

    fn reveals(&self) -> Reveals {
        Reveals::WeightedSum
    }

    fn validate(&self, settings: &toml::Table, job: &JobFacts) -> Vec<Problem> {
        match SecAggSettings::from_table(settings) {
            Ok(s) => s.check(job),
            Err(problems) => problems,
        }
    }

    fn noise_carrier(&self, settings: &toml::Table, job: &JobFacts) -> Option<super::NoiseCarrier> {
        let s = SecAggSettings::from_table(settings).ok()?;
        // At most ⌊γN⌋ of the job's N parties collude, in whatever round
        // the coordinator puts them (each round's threshold counts them
        // too: `federation_corrupt`). Only rounds on the complete graph reveal a
        // single sum over at least parties.min survivors; with sparse
        // graphs SecAgg+ proves far less (docs/secure-aggregation.md).
        let corrupt_parties = params::corrupt_parties(job.party_bound(), &s.threat_model());
        Some(super::NoiseCarrier { bits: s.bits, corrupt_parties, max_parties: params::COMPLETE_UP_TO })
    }

    fn tolerated_corrupt_fraction(&self, settings: &toml::Table) -> Option<f64> {
        SecAggSettings::from_table(settings).ok().map(|s| s.corrupt_fraction)
    }

    fn explain(&self, settings: &toml::Table, job: &JobFacts) -> Vec<String> {
        let Ok(s) = SecAggSettings::from_table(settings) else { return Vec::new() };
        let tm = s.threat_model();
        let mut lines = vec![format!(
            "secagg threat model: up to {:.0}% of the parties corrupt (colluding with the coordinator), \
             up to {:.0}% dropping out; privacy at 2^-{} and correctness at 2^-{}",
            tm.corrupt_fraction * 100.0,
            tm.dropout_fraction * 100.0,
            params::SIGMA,
            params::ETA
        )];
        for n in round_sizes(job) {
            match params::choose_in(n, &tm, federation_corrupt(job, &tm)) {
                Ok(p) => lines.push(format!("secagg with {n} parties: {p}")),
                Err(e) => lines.push(format!("secagg with {n} parties: {e}")),
            }
        }
        lines
    }

    fn server(
        &self,
        settings: &toml::Table,
        job: &JobFacts,
        peers: Box<dyn PeerVerifier>,
    ) -> Result<Box<dyn AggregationServer>, Error> {
        let settings = settings_for(settings, job)?;
        let dp_clip = job.distributed_dp.map_or(0.0, |t| t.clip);
        Ok(Box::new(SecAggServer { settings, job: job.clone(), dp_clip, peers, round: None, next_run: first_run() }))
    }

    fn client(
        &self,
        settings: &toml::Table,
        job: &JobFacts,
        party: PartyIdentity,
    ) -> Result<Box<dyn AggregationClient>, Error> {
        let settings = settings_for(settings, job)?;
        Ok(Box::new(SecAggClient {
            settings,
            job: job.clone(),
            party,
            round: None,
            noise: Default::default(),
            last_mechanism: None,
        }))
    }
}

fn settings_for(table: &toml::Table, job: &JobFacts) -> Result<SecAggSettings, Error> {
    let s = SecAggSettings::from_table(table).map_err(|p| problems(&p))?;
    let checked = s.check(job);
    if checked.is_empty() { Ok(s) } else { Err(problems(&checked)) }
}

fn problems(p: &[Problem]) -> Error {
    let text: Vec<String> = p.iter().map(|p| format!("{}: {}", p.field, p.message)).collect();
    Error::InvalidInput(format!("aggregation.secagg: {}", text.join("; ")))
}

/// This module's messages, as prost types (public for tools and adversarial
/// tests that craft them): the wire form of
/// [`crate::secagg::protocol`]'s messages, whose fields they mirror.
#[allow(missing_docs)]
pub mod wire {
    /// The round's public parameters (with the fit task).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoundConfig {
        /// The round's parties, sorted; Shamir x-coordinate = index + 1.
        #[prost(string, repeated, tag = "1")]
        pub parties: Vec<String>,
        #[prost(uint32, tag = "2")]
        pub threshold: u32,
        #[prost(uint32, tag = "3")]
        pub degree: u32,
        #[prost(bytes = "vec", tag = "4")]
        pub graph_seed: Vec<u8>,
        #[prost(uint32, tag = "5")]
        pub bits: u32,
        /// Encoded vector length: the model's values plus one weight coordinate.
        #[prost(uint64, tag = "6")]
        pub dim: u64,
        #[prost(float, tag = "7")]
        pub clip: f32,
        #[prost(uint64, tag = "8")]
        pub max_examples: u64,
        /// The version of the revocation list the round's certificates are
        /// checked against.
        #[prost(uint64, tag = "9")]
        pub revocation_version: u64,
        /// Party-level DP with distributed noise: the mechanism's digest
        /// ([`super::NoisyUpdate::digest`]); empty without.
        #[prost(bytes = "vec", tag = "10")]
        pub dp_digest: Vec<u8>,
        /// Distributed DP with adaptive clipping: the round's clip (the
        /// coordinator's to choose: privacy does not depend on it).
        #[prost(double, tag = "11")]
        pub dp_clip: f64,
        /// Which run of the round this is: the coordinator's, strictly
        /// increasing over the job's runs (a round it runs again gets a new
        /// one). A party takes part in runs in increasing order, each once,
        /// and the run is bound into every signature, so what a party
        /// signed in one run does not verify in another.
        #[prost(uint64, tag = "12")]
        pub run: u64,
    }

    /// A party's signed round keys and the certificate that verifies them.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Keys {
        #[prost(string, tag = "1")]
        pub party: String,
        #[prost(bytes = "vec", tag = "2")]
        pub enc_pk: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub mask_pk: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub signature: Vec<u8>,
        /// DER, relayed by the coordinator from the party's TLS connection.
        #[prost(bytes = "vec", tag = "5")]
        pub certificate: Vec<u8>,
        /// Commitment to the party's self-mask seed.
        #[prost(bytes = "vec", tag = "6")]
        pub seed_commitment: Vec<u8>,
        /// Proof that the party knows `enc_pk`'s secret (64 bytes).
        #[prost(bytes = "vec", tag = "7")]
        pub enc_proof: Vec<u8>,
    }

    /// The neighbours' keys (secagg-shares task).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyList {
        #[prost(message, repeated, tag = "1")]
        pub keys: Vec<Keys>,
    }

    /// A dealer's two encrypted shares for one holder.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Share {
        #[prost(string, tag = "1")]
        pub from: String,
        #[prost(string, tag = "2")]
        pub to: String,
        #[prost(bytes = "vec", tag = "3")]
        pub self_mask_nonce: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub self_mask: Vec<u8>,
        #[prost(bytes = "vec", tag = "5")]
        pub mask_key_nonce: Vec<u8>,
        #[prost(bytes = "vec", tag = "6")]
        pub mask_key: Vec<u8>,
        /// Relayed to the holder: the dealer's signature over the Merkle
        /// root of its shares' digests (`Config::shares_transcript`)...
        #[prost(bytes = "vec", tag = "7")]
        pub dealer_signature: Vec<u8>,
        /// ...the tree's leaf count, this share's leaf...
        #[prost(uint32, tag = "8")]
        pub dealer_leaves: u32,
        #[prost(uint32, tag = "9")]
        pub dealer_leaf: u32,
        /// ...and the path from it to the root, so the holder can tell a
        /// share its dealer sealed wrongly from one altered in transit.
        #[prost(bytes = "vec", repeated, tag = "10")]
        pub dealer_path: Vec<Vec<u8>>,
    }

    /// Encrypted shares (secagg-shares answer, secagg-masked-input task).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Shares {
        #[prost(message, repeated, tag = "1")]
        pub shares: Vec<Share>,
        /// In the answer: the dealer's identity signature over all of them
        /// (`Config::shares_transcript`), checked by the coordinator.
        #[prost(bytes = "vec", tag = "2")]
        pub signature: Vec<u8>,
    }

    /// The survivor set: the parties whose masked inputs are in the sum,
    /// sorted (secagg-consistency task).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Survivors {
        #[prost(string, repeated, tag = "1")]
        pub survivors: Vec<String>,
    }

    /// A party's signature on the survivor set (secagg-consistency answer;
    /// relayed with the signer's certificate in the unmask task).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SurvivorSignature {
        #[prost(string, tag = "1")]
        pub party: String,
        #[prost(bytes = "vec", tag = "2")]
        pub signature: Vec<u8>,
        /// DER, relayed by the coordinator from the signer's TLS connection.
        #[prost(bytes = "vec", tag = "3")]
        pub certificate: Vec<u8>,
    }

    /// The survivor set and the signatures on it the party needs
    /// (secagg-unmask task). Who dropped the party derives itself.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UnmaskRequest {
        #[prost(string, repeated, tag = "1")]
        pub survivors: Vec<String>,
        #[prost(message, repeated, tag = "2")]
        pub signatures: Vec<SurvivorSignature>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OwnerShare {
        #[prost(string, tag = "1")]
        pub owner: String,
        #[prost(bytes = "vec", tag = "2")]
        pub share: Vec<u8>,
        /// The key of this share as its dealer sent it.
        #[prost(bytes = "vec", tag = "3")]
        pub key: Vec<u8>,
    }

    /// A holder's proof that a dealer's share does not open
    /// (`secagg::protocol::ShareComplaint` on the wire), as `he`'s.
    pub use crate::dleq::WireComplaint as ShareComplaint;

    /// What comes with a masked input (secagg-masked-input answer's body;
    /// empty, as it usually is, when there is nothing to complain about).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MaskedComplaints {
        #[prost(message, repeated, tag = "1")]
        pub complaints: Vec<ShareComplaint>,
    }

    /// The shares that remove the masks (secagg-unmask answer).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct UnmaskShares {
        #[prost(message, repeated, tag = "1")]
        pub self_mask: Vec<OwnerShare>,
        #[prost(message, repeated, tag = "2")]
        pub mask_key: Vec<OwnerShare>,
    }
}

/// Largest signature or certificate accepted in a key advert.
const MAX_SIGNATURE: usize = 512;
const MAX_CERTIFICATE: usize = 16 << 10;

fn array<const N: usize>(b: &[u8], from: &str, what: &str) -> Result<[u8; N], Error> {
    b.try_into().map_err(|_| Error::PeerMisbehaved {
        party: from.to_owned(),
        reason: format!("{what}: {} bytes, expected {N}", b.len()),
    })
}

fn keys_to_wire(k: &AdvertiseKeys, certificate: &[u8]) -> wire::Keys {
    wire::Keys {
        party: k.party.clone(),
        enc_pk: k.enc_pk.to_vec(),
        mask_pk: k.mask_pk.to_vec(),
        signature: k.signature.clone(),
        certificate: certificate.to_vec(),
        seed_commitment: k.seed_commitment.to_vec(),
        enc_proof: k.enc_proof.to_bytes().to_vec(),
    }
}

fn keys_from_wire(k: wire::Keys, from: &str) -> Result<(AdvertiseKeys, Vec<u8>), Error> {
    if k.signature.len() > MAX_SIGNATURE || k.certificate.len() > MAX_CERTIFICATE {
        return Err(Error::PeerMisbehaved {
            party: from.to_owned(),
            reason: format!("keys of {}: signature or certificate too large", k.party),
        });
    }
    let advert = AdvertiseKeys {
        enc_pk: array(&k.enc_pk, from, "enc_pk")?,
        enc_proof: crate::dleq::PossessionProof::from_bytes(&k.enc_proof, from)?,
        mask_pk: array(&k.mask_pk, from, "mask_pk")?,
        seed_commitment: array(&k.seed_commitment, from, "seed_commitment")?,
        party: k.party,
        signature: k.signature,
    };
    Ok((advert, k.certificate))
}

fn shares_to_wire(s: &[EncryptedShare], signature: Vec<u8>) -> wire::Shares {
    wire::Shares {
        signature,
        shares: s
            .iter()
            .map(|e| wire::Share {
                from: e.from.clone(),
                to: e.to.clone(),
                self_mask_nonce: e.self_mask.nonce.to_vec(),
                self_mask: e.self_mask.ciphertext.clone(),
                mask_key_nonce: e.mask_key.nonce.to_vec(),
                mask_key: e.mask_key.ciphertext.clone(),
                dealer_signature: Vec::new(),
                dealer_leaves: 0,
                dealer_leaf: 0,
                dealer_path: Vec::new(),
            })
            .collect(),
    }
}

fn shares_from_wire(s: wire::Shares, from: &str, max: usize) -> Result<Vec<EncryptedShare>, Error> {
    let bad = |reason: String| Error::PeerMisbehaved { party: from.to_owned(), reason };
    if s.shares.len() > max {
        return Err(bad(format!("{} shares; at most {max}", s.shares.len())));
    }
    s.shares
        .into_iter()
        .map(|e| {
            if e.self_mask.len() > 1024 || e.mask_key.len() > 1024 {
                return Err(bad("share ciphertext too large".into()));
            }
            Ok(EncryptedShare {
                self_mask: Sealed { nonce: array(&e.self_mask_nonce, from, "nonce")?, ciphertext: e.self_mask },
                mask_key: Sealed { nonce: array(&e.mask_key_nonce, from, "nonce")?, ciphertext: e.mask_key },
                from: e.from,
                to: e.to,
            })
        })
        .collect()
}

/// Each dealer's signature, leaf count, this holder's leaf and the path to
/// the root, as the coordinator relays them with the shares it forwards
/// (bounded: a path of at most 64 hashes of 32 bytes, a signature of at most
/// `MAX_SIGNATURE`).
struct Evidence {
    signature: Vec<u8>,
    leaves: usize,
    leaf: usize,
    path: Vec<[u8; 32]>,
}

type DealerEvidence = BTreeMap<String, Evidence>;

fn dealer_evidence(s: &wire::Shares) -> Result<DealerEvidence, Error> {
    let mut out = BTreeMap::new();
    for share in &s.shares {
        if share.dealer_signature.len() > MAX_SIGNATURE || share.dealer_path.len() > 64 {
            return Err(coordinator_fault(format!("oversized evidence for the share of {}", share.from)));
        }
        let path = share
            .dealer_path
            .iter()
            .map(|d| <[u8; 32]>::try_from(d.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| coordinator_fault(format!("a malformed path for the share of {}", share.from)))?;
        let evidence = Evidence {
            signature: share.dealer_signature.clone(),
            leaves: share.dealer_leaves as usize,
            leaf: share.dealer_leaf as usize,
            path,
        };
        out.insert(share.from.clone(), evidence);
    }
    Ok(out)
}

/// Whether every relayed share is exactly what its dealer signed: checked
/// once something is wrong (a share did not open, or the stage failed),
/// before the holder blames or complains about any dealer. A share its
/// dealer did not sign was altered on the way, by the coordinator: the
/// holder cannot tell the two apart from the ciphertext alone, and without
/// this a coordinator could make a party refuse or complain, pointing at an
/// honest dealer (and collect the pair's keys from the complaint).
fn check_dealers_signed(
    shares: &[EncryptedShare],
    evidence: &DealerEvidence,
    cfg: &Config,
    peers: &dyn PeerVerifier,
) -> Result<(), Error> {
    for share in shares {
        let dealer = &share.from;
        let signed = evidence.get(dealer).is_some_and(|ev| {
            share_tree_root_from(Config::share_digest(share), ev.leaf, ev.leaves, &ev.path).is_some_and(|root| {
                peers.verify(dealer, &cfg.root_transcript(dealer, ev.leaves, &root), &ev.signature).is_ok()
            })
        });
        if !signed {
            return Err(coordinator_fault(format!("relayed a share of {dealer} that {dealer} did not sign")));
        }
    }
    Ok(())
}

fn complaints_to_wire(complaints: &[ShareComplaint]) -> Vec<u8> {
    if complaints.is_empty() {
        return Vec::new();
    }
    let complaints = complaints
        .iter()
        .map(|c| wire::ShareComplaint {
            dealer: c.dealer.clone(),
            shared: c.shared.to_vec(),
            proof: c.proof.to_bytes().to_vec(),
        })
        .collect();
    prost::Message::encode_to_vec(&wire::MaskedComplaints { complaints })
}

/// A masked input's complaints, at most one per neighbour (`degree`).
fn complaints_from_wire(body: Vec<u8>, party: &str, degree: usize) -> Result<Vec<ShareComplaint>, Error> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    // A complaint is a name (at most 63 bytes), 32 and 64 bytes, and
    // prost's tags and lengths: bounded before it is decoded.
    if body.len() > degree.saturating_mul(192) {
        return Err(Error::PeerMisbehaved {
            party: party.to_owned(),
            reason: format!("{} bytes of share complaints; it has {degree} neighbours", body.len()),
        });
    }
    let list: wire::MaskedComplaints = Envelope::body(body).decode(party, "share complaints")?;
    if list.complaints.len() > degree {
        return Err(Error::PeerMisbehaved {
            party: party.to_owned(),
            reason: format!("{} share complaints; it has {degree} neighbours", list.complaints.len()),
        });
    }
    list.complaints
        .into_iter()
        .map(|c| {
            if c.dealer.len() > crate::pki::MAX_PARTY_NAME_LEN {
                return Err(Error::PeerMisbehaved {
                    party: party.to_owned(),
                    reason: "an oversized dealer name in a complaint".into(),
                });
            }
            Ok(ShareComplaint {
                shared: array(&c.shared, party, "complaint's shared value")?,
                proof: DleqProof::from_bytes(&c.proof, party)?,
                dealer: c.dealer,
            })
        })
        .collect()
}

fn unmask_shares_to_wire(u: &UnmaskShares) -> wire::UnmaskShares {
    let conv = |v: &[(String, Share)]| {
        v.iter()
            .map(|(o, s)| wire::OwnerShare {
                owner: o.clone(),
                share: s.to_bytes().to_vec(),
                key: u.keys.get(o).map(|k| k.to_vec()).unwrap_or_default(),
            })
            .collect()
    };
    wire::UnmaskShares { self_mask: conv(&u.self_mask), mask_key: conv(&u.mask_key) }
}

fn unmask_shares_from_wire(u: wire::UnmaskShares, party: &str, max: usize) -> Result<UnmaskShares, Error> {
    let bad = |reason: String| Error::PeerMisbehaved { party: party.to_owned(), reason };
    if u.self_mask.len() > max || u.mask_key.len() > max {
        return Err(bad(format!("more than {max} unmask shares")));
    }
    let mut keys = BTreeMap::new();
    let mut conv = |v: Vec<wire::OwnerShare>| -> Result<Vec<(String, Share)>, Error> {
        v.into_iter()
            .map(|o| {
                let key: [u8; 32] = array(&o.key, party, "share key")?;
                keys.insert(o.owner.clone(), key);
                Share::from_bytes(&o.share)
                    .map(|s| (o.owner.clone(), s))
                    .map_err(|e| bad(format!("share of {}: {e}", o.owner)))
            })
            .collect()
    };
    let self_mask = conv(u.self_mask)?;
    let mask_key = conv(u.mask_key)?;
    Ok(UnmaskShares { party: party.to_owned(), self_mask, mask_key, keys })
}

/// The round's public parameters over `parties`: the degree and threshold
/// from the job's threat model ([`params::choose`]: the complete graph up to
/// 20 parties), and the graph seed a hash of the job and round.
/// `subject` is what the round sums: the digest of the global model and the
/// fit configuration ([`super::training_digest`]) for updates, a
/// [`SumLayout`]'s digest for statistics; the binding hashes it with every
/// other parameter of the round.
fn round_config(
    job: &str,
    round: u32,
    parties: &[String],
    dim: usize,
    s: &SecAggSettings,
    bound: Bound,
    facts: &JobFacts,
) -> Result<Config, Error> {
    let Bound { subject, revocation_version, dp, run } = bound;
    use sha2::Digest;
    let tm = s.threat_model();
    let chosen = params::choose_in(parties.len(), &tm, federation_corrupt(facts, &tm))?;
    let (degree, threshold) = (chosen.degree, chosen.threshold);
    let mut seed_input = job.as_bytes().to_vec();
    seed_input.extend_from_slice(&round.to_le_bytes());
    let graph_seed: [u8; 32] = sha2::Sha256::digest(&seed_input).into();
    let mut h = sha2::Sha256::new();
    // v2: the mask streams share the round's IV (`prim::mask_iv`). A party
    // of another version binds another round, so a mixed round fails at the
    // signature checks instead of summing to garbage.
    // v4: the run (see `wire::RoundConfig::run`).
    h.update(b"confide secagg round v4");
    let names: Vec<&str> = parties.iter().map(String::as_str).collect();
    h.update(crate::secagg::prim::context("round", job, round, &names));
    for v in [
        threshold as u64,
        degree as u64,
        u64::from(s.bits),
        dim as u64,
        u64::from(s.clip.to_bits()),
        s.max_examples,
        revocation_version,
        run,
    ] {
        h.update(v.to_le_bytes());
    }
    h.update(graph_seed);
    h.update(subject);
    if let Some(dp) = dp {
        h.update(b"distributed dp");
        h.update(dp);
    }
    Ok(Config {
        job: job.to_owned(),
        round,
        parties: parties.to_vec(),
        threshold,
        degree,
        graph_seed,
        bits: s.bits,
        dim,
        binding: h.finalize().into(),
        min_survivors: facts.min_parties.max(MIN_ROUND_PARTIES),
    })
}

/// What a round is bound to besides its parameters.
#[derive(Debug, Clone, Copy)]
struct Bound {
    /// What it sums (see [`round_config`]).
    subject: [u8; 32],
    /// The revocation list its certificates are checked against.
    revocation_version: u64,
    /// The distributed DP mechanism's digest, when updates carry noise.
    dp: Option<[u8; 32]>,
    /// Which run of the round (`wire::RoundConfig::run`).
    run: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerStage {
    Keys,
    Shares,
    Masked,
    Consistency,
    Unmask,
}

/// What the coordinator keeps of a dealer's signed shares to relay with
/// each: the signature, the tree over the shares' digests, and the holders
/// in leaf order (to find a holder's leaf without hashing again).
struct DealtEvidence {
    signature: Vec<u8>,
    tree: ShareTree,
    holders: Vec<String>,
}

struct ServerRound {
    server: Server,
    decoding: Decoding,
    stage: ServerStage,
    /// Each advertiser's certificate, relayed with its keys.
    certs: BTreeMap<String, Vec<u8>>,
    /// Each dealer's signature, share tree and holders (in leaf order),
    /// relayed with each of its shares.
    evidence: BTreeMap<String, DealtEvidence>,
}

struct SecAggServer {
    settings: SecAggSettings,
    job: JobFacts,
    /// Distributed DP: the clip of the next round (moved each round under
    /// adaptive clipping).
    dp_clip: f64,
    /// Checks the parties' certificates and signatures before anything of
    /// theirs is relayed.
    peers: Box<dyn PeerVerifier>,
    round: Option<ServerRound>,
    /// The next round's run number: from the clock (in microseconds) when
    /// the server was made, so that a coordinator restarted with the job
    /// numbers its runs above the ones parties already took, then one up
    /// per round started.
    next_run: u64,
}

/// Where the coordinator's checkpoint keeps its next run number.
const NEXT_RUN_STATE: &str = "secagg_next_run";
/// The largest run number a checkpoint holds exactly (2^53).
const MAX_EXACT_RUN: f64 = 9_007_199_254_740_992.0;
/// A coordinator restored from a checkpoint numbers its runs at least this
/// far above the checkpoint's next run: above every run the process that
/// wrote it started after it (one a round), whatever its clock says.
const RESTORE_MARGIN: u64 = 1 << 20;

/// The first run number of a coordinator's job: microseconds since the Unix
/// epoch, or above the checkpoint's when it resumes one (a coordinator
/// whose clock went back and that has no checkpoint of the job has its runs
/// refused until the clock passes the last run a party took).
fn first_run() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl SecAggServer {
    fn begin(
        &mut self,
        round: u32,
        parties: &[String],
        dim: usize,
        subject: [u8; 32],
        decoding: Decoding,
    ) -> Result<Vec<u8>, Error> {
        let revocations = self.peers.revocation_version();
        let (dp, dp_clip) = match &decoding {
            Decoding::Noisy(n) => (Some(n.digest()), n.clip()),
            _ => (None, 0.0),
        };
        let run = self.next_run;
        self.next_run = run.saturating_add(1);
        let config = round_config(
            &self.job.job_id,
            round,
            parties,
            dim,
            &self.settings,
            Bound { subject, revocation_version: revocations, dp, run },
            &self.job,
        )?;
        let s = &self.settings;
        let msg = wire::RoundConfig {
            run,
            revocation_version: revocations,
            parties: config.parties.clone(),
            threshold: config.threshold as u32,
            degree: config.degree as u32,
            graph_seed: config.graph_seed.to_vec(),
            bits: config.bits,
            dim: config.dim as u64,
            clip: s.clip,
            max_examples: s.max_examples,
            dp_digest: dp.map(|d| d.to_vec()).unwrap_or_default(),
            dp_clip,
        };
        let server = Server::new(config)?;
        self.round = Some(ServerRound {
            server,
            decoding,
            stage: ServerStage::Keys,
            certs: BTreeMap::new(),
            evidence: BTreeMap::new(),
        });
        Ok(prost::Message::encode_to_vec(&msg))
    }
}

impl AggregationServer for SecAggServer {
    fn begin_round(&mut self, round: &RoundInfo<'_>) -> Result<Vec<u8>, Error> {
        let Some(fit) = round.fit else {
            return Err(Error::InvalidInput(
                "the strategy gave the parties different fit configurations; under secure aggregation every party \
                 must get the same one (a configuration of its own would let the coordinator read one party's \
                 update off the sum)"
                    .into(),
            ));
        };
        let s = &self.settings;
        let (dim, decoding) = match &self.job.distributed_dp {
            Some(template) => {
                let adaptive = self.job.adaptive_clip.as_ref();
                let noisy = NoisyUpdate::with_clip(
                    template,
                    adaptive,
                    self.dp_clip,
                    &self.job.job_id,
                    round.round,
                    round.global,
                )?;
                (noisy.words(), Decoding::Noisy(Box::new(noisy)))
            }
            None => (
                WeightedUpdate::words(round.global.num_values()),
                Decoding::Updates(WeightedUpdate::new(s.bits, s.clip, s.max_examples, round.parties.len())?),
            ),
        };
        self.begin(round.round, round.parties, dim, super::training_digest(round.global, fit), decoding)
    }

    fn begin_sum(&mut self, round: &SumRound<'_>) -> Result<Vec<u8>, Error> {
        let encoding = WideSum::new(self.settings.bits, self.job.party_bound())?;
        let dim = encoding.words(round.layout.values);
        if dim == 0 || dim > self.job.max_values + 1 {
            return Err(Error::InvalidInput(format!(
                "a {} sum of {} values exceeds the job's limit",
                round.layout.purpose, round.layout.values
            )));
        }
        self.begin(round.round, round.parties, dim, round.layout.digest, Decoding::Statistics(encoding))
    }

    fn on_message(&mut self, from: Peer<'_>, message: Envelope) -> Result<(), Error> {
        let party = from.name;
        let max = self.job.max_parties;
        let r =
            self.round.as_mut().ok_or_else(|| Error::WrongStage("no secure-aggregation round in progress".into()))?;
        let peers = self.peers.as_mut();
        let misbehaved = |reason: &str| Error::PeerMisbehaved { party: party.to_owned(), reason: reason.to_owned() };
        match (r.stage, message.bulk) {
            (ServerStage::Keys, Some(Bulk::Params(_))) => {
                Err(misbehaved("sent a plaintext update in a secure-aggregation job"))
            }
            (ServerStage::Keys, None) => {
                let keys: wire::Keys = Envelope::body(message.body).decode(party, "round keys")?;
                let (advert, _) = keys_from_wire(keys, party)?;
                if advert.party != party {
                    return Err(misbehaved(&format!("advertised keys for {}", advert.party)));
                }
                peers.add_peer(party, from.certificate)?;
                r.server.on_keys(advert, &*peers)?;
                r.certs.insert(party.to_owned(), from.certificate.to_vec());
                Ok(())
            }
            (ServerStage::Shares, None) => {
                let shares: wire::Shares = Envelope::body(message.body).decode(party, "shares")?;
                if shares.signature.len() > MAX_SIGNATURE {
                    return Err(misbehaved("sent an oversized signature"));
                }
                let signature = shares.signature.clone();
                let shares = shares_from_wire(shares, party, max)?;
                // The dealer signs its shares: the evidence that names it if
                // one of them turns out not to fit at unmasking, or not to
                // open at its holder.
                let transcript = r.server.config().shares_transcript(party, &shares);
                peers
                    .verify(party, &transcript, &signature)
                    .map_err(|_| misbehaved("its shares do not carry its signature"))?;
                let tree = ShareTree::new(&Config::share_digests(&shares));
                let mut holders: Vec<String> = shares.iter().map(|s| s.to.clone()).collect();
                holders.sort();
                r.server.on_shares(party, shares)?;
                r.evidence.insert(party.to_owned(), DealtEvidence { signature, tree, holders });
                Ok(())
            }
            (ServerStage::Masked, Some(Bulk::Words(words))) => {
                let complaints = complaints_from_wire(message.body, party, r.server.config().degree)?;
                // Packed at the round's b bits (`secagg::packing`).
                let (dim, bits) = (r.server.config().dim, r.server.config().bits);
                let values = crate::secagg::packing::unpack(words, dim, bits)
                    .map_err(|e| misbehaved(&format!("sent a masked input that is not packed as the round's: {e}")))?;
                r.server.on_masked(MaskedInput { party: party.to_owned(), values, complaints })
            }
            (ServerStage::Consistency, None) => {
                let sig: wire::SurvivorSignature =
                    Envelope::body(message.body).decode(party, "survivor-set signature")?;
                if sig.party != party {
                    return Err(misbehaved(&format!("signed the survivor set as {}", sig.party)));
                }
                r.server
                    .on_survivor_signature(SurvivorSignature { party: sig.party, signature: sig.signature }, &*peers)
            }
            (ServerStage::Unmask, None) => {
                let u: wire::UnmaskShares = Envelope::body(message.body).decode(party, "unmask shares")?;
                r.server.on_unmask(unmask_shares_from_wire(u, party, max)?)
            }
            (stage, _) => Err(misbehaved(&format!("sent a message of the wrong form for the {stage:?} stage"))),
        }
    }

    fn close_stage(&mut self) -> Result<Progress, Error> {
        let mut next_clip = None;
        let r =
            self.round.as_mut().ok_or_else(|| Error::WrongStage("no secure-aggregation round in progress".into()))?;
        let progress = match r.stage {
            ServerStage::Keys => {
                let live = r.server.close_keys()?;
                let mut per_party = Vec::with_capacity(live.len());
                for p in live {
                    let keys = r.server.keys_for(&p)?;
                    let list = wire::KeyList {
                        keys: keys
                            .iter()
                            .map(|k| keys_to_wire(k, r.certs.get(&k.party).map(Vec::as_slice).unwrap_or_default()))
                            .collect(),
                    };
                    per_party.push((p, Envelope::encode(&list)));
                }
                r.stage = ServerStage::Shares;
                Progress::Step { stage: SHARES, messages: Messages::PerParty(per_party), quorum: Quorum::JobMinimum }
            }
            ServerStage::Shares => {
                let live = r.server.close_shares()?;
                let per_party = live
                    .into_iter()
                    .map(|p| {
                        let dealt = r.server.shares_for(&p);
                        let mut shares = shares_to_wire(&dealt, Vec::new());
                        for (w, e) in shares.shares.iter_mut().zip(&dealt) {
                            let Some(ev) = r.evidence.get(&e.from) else { continue };
                            // The share's leaf: its holder's place among the
                            // dealer's holders.
                            let Ok(leaf) = ev.holders.binary_search(&e.to) else { continue };
                            w.dealer_signature = ev.signature.clone();
                            w.dealer_leaves = ev.holders.len() as u32;
                            w.dealer_leaf = leaf as u32;
                            w.dealer_path = ev.tree.path(leaf).iter().map(|d| d.to_vec()).collect();
                        }
                        (p, Envelope::encode(&shares))
                    })
                    .collect();
                r.stage = ServerStage::Masked;
                Progress::Step {
                    stage: MASKED_INPUT,
                    messages: Messages::PerParty(per_party),
                    quorum: Quorum::JobMinimum,
                }
            }
            ServerStage::Masked => {
                let survivors = r.server.close_masked()?;
                let message = Envelope::encode(&wire::Survivors { survivors: survivors.clone() });
                r.stage = ServerStage::Consistency;
                // Each party's neighbours must sign, not a head count.
                Progress::Step {
                    stage: CONSISTENCY,
                    messages: Messages::Same { to: survivors, message },
                    quorum: Quorum::Protocol,
                }
            }
            ServerStage::Consistency => {
                let requests = r.server.close_consistency()?;
                let per_party = requests
                    .into_iter()
                    .map(|(p, req)| {
                        let signatures = req
                            .signatures
                            .into_iter()
                            .map(|s| wire::SurvivorSignature {
                                certificate: r.certs.get(&s.party).cloned().unwrap_or_default(),
                                party: s.party,
                                signature: s.signature,
                            })
                            .collect();
                        (p, Envelope::encode(&wire::UnmaskRequest { survivors: req.survivors, signatures }))
                    })
                    .collect();
                r.stage = ServerStage::Unmask;
                Progress::Step { stage: UNMASK, messages: Messages::PerParty(per_party), quorum: Quorum::Protocol }
            }
            ServerStage::Unmask => {
                let (sum, contributors) = r.server.finish()?;
                let misbehaved = r.server.flagged().iter().map(|(p, why)| (p.clone(), why.clone())).collect();
                let aggregate;
                (aggregate, next_clip) = r.decoding.aggregate(&self.job, &sum, contributors, misbehaved)?;
                self.round = None;
                Progress::Done(aggregate)
            }
        };
        if let Some(clip) = next_clip {
            self.dp_clip = clip;
        }
        Ok(progress)
    }

    fn state(&self) -> confide_algorithms::State {
        let mut state = super::adaptive_clip_state(&self.job, self.dp_clip);
        // Microseconds since 1970 are below 2^53: exact as a float.
        state.insert(NEXT_RUN_STATE, vec![self.next_run as f64]);
        state
    }

    fn restore(&mut self, state: &confide_algorithms::State) -> Result<(), Error> {
        if let Some(clip) = super::restore_adaptive_clip(&self.job, state)? {
            self.dp_clip = clip;
        }
        // Runs go on above the checkpoint's even if the clock went back.
        match state.get(NEXT_RUN_STATE) {
            None => {}
            Some(&[run]) if run.is_finite() && (0.0..=MAX_EXACT_RUN).contains(&run) => {
                self.next_run = self.next_run.max((run as u64).saturating_add(RESTORE_MARGIN));
            }
            Some(other) => {
                return Err(Error::InvalidInput(format!(
                    "the checkpoint's {NEXT_RUN_STATE} is {other:?}, not a run number"
                )));
            }
        }
        Ok(())
    }
}

struct ClientRound {
    round: u32,
    client: Client,
    /// The encoded update until it is masked in place.
    input: Vec<u32>,
    /// A round answered before training: how its update is encoded once
    /// it is supplied (`None` since, and for a round started with it).
    encoder: Option<Encoder>,
    /// Keys are in and shares sent: the masks can be computed ahead.
    keyed: bool,
    /// The input was handed to [`Client::premask`].
    premasked: bool,
}

/// How a round's update is encoded, fixed (its noise drawn) when the
/// round's keys go out.
enum Encoder {
    /// Distributed DP: the mechanism and this round's noise.
    Noisy(Box<(NoisyUpdate, DdgNoise)>),
    /// The weighted update without noise.
    Weighted(WeightedUpdate),
}

impl Encoder {
    fn encode(self, update: LocalUpdate<'_>) -> Result<Vec<u32>, Error> {
        match self {
            Encoder::Noisy(noisy) => {
                let (noisy, noise) = *noisy;
                noisy.encode(update.global, &update.local, noise)
            }
            Encoder::Weighted(w) => w.encode(update.global, &update.local, update.num_examples, update.train_loss),
        }
    }
}

impl Drop for ClientRound {
    fn drop(&mut self) {
        // The encoding of the party's update is as private as the update.
        self.input.zeroize();
    }
}

struct SecAggClient {
    settings: SecAggSettings,
    job: JobFacts,
    party: PartyIdentity,
    round: Option<ClientRound>,
    /// Distributed DP: noise drawn ahead for the next rounds (see
    /// [`AggregationClient::prepare`]), each used once.
    noise: NoisePool,
    /// The last round's mechanism, to draw the next round's noise with.
    last_mechanism: Option<Ddg>,
}

fn coordinator_fault(reason: impl Into<String>) -> Error {
    Error::PeerMisbehaved { party: "coordinator".into(), reason: reason.into() }
}

impl AggregationClient for SecAggClient {
    fn contribute(&mut self, round: u32, round_message: &[u8], update: LocalUpdate<'_>) -> Result<Envelope, Error> {
        let keys = self.contribute_ahead(round, round_message, update.global, update.fit)?;
        self.supply_update(round, update)?;
        Ok(keys)
    }

    fn answers_fit_before_training(&self) -> bool {
        true
    }

    fn contribute_ahead(
        &mut self,
        round: u32,
        round_message: &[u8],
        global: &confide_algorithms::Parameters,
        fit: &FitConfig,
    ) -> Result<Envelope, Error> {
        self.round = None;
        // The round's keys bind what the party knows before it trains: the
        // model and configuration it trains from, and the encoding (with
        // its noise) its update will take.
        let training = super::training_digest(global, fit);
        let (config, encoder) = if let Some(template) = &self.job.distributed_dp {
            let clip = self.round_clip(template, round_message)?;
            let adaptive = self.job.adaptive_clip.as_ref();
            let noisy = NoisyUpdate::with_clip(template, adaptive, clip, &self.job.job_id, round, global)?;
            let bound = Some(noisy.digest());
            let config = self.derive_round(round, round_message, noisy.words(), training, bound)?;
            let noise = self.noise.take_for(&noisy)?;
            self.last_mechanism = Some(noisy.mechanism().clone());
            (config, Encoder::Noisy(Box::new((noisy, noise))))
        } else {
            let dim = WeightedUpdate::words(global.num_values());
            let config = self.derive_round(round, round_message, dim, training, None)?;
            let s = &self.settings;
            let encoding = WeightedUpdate::new(s.bits, s.clip, s.max_examples, config.parties.len())?;
            (config, Encoder::Weighted(encoding))
        };
        let (client, advert) = Client::new(config, &self.party.name, self.party.signer.as_ref(), &mut OsRng)?;
        self.round = Some(ClientRound {
            round,
            client,
            input: Vec::new(),
            encoder: Some(encoder),
            keyed: false,
            premasked: false,
        });
        Ok(Envelope::encode(&keys_to_wire(&advert, &[])))
    }

    fn supply_update(&mut self, round: u32, update: LocalUpdate<'_>) -> Result<(), Error> {
        let encoder = match self.round.as_mut() {
            Some(r) if r.round == round => r.encoder.take(),
            _ => None,
        };
        let Some(encoder) = encoder else {
            return Err(Error::WrongStage(format!("no round {round} here waiting for its update")));
        };
        match encoder.encode(update) {
            Ok(input) => {
                // The round taken the encoder from above: still this one.
                if let Some(r) = self.round.as_mut() {
                    r.input = input;
                }
                Ok(())
            }
            Err(e) => {
                // No update to mask: the round is over for this party.
                self.round = None;
                Err(e)
            }
        }
    }

    fn needs_update_for(&self, stage: StageName) -> bool {
        // Only once the shares are dealt: a masked-input step asked for
        // before is the coordinator's fault, refused without waiting for
        // the training.
        stage == MASKED_INPUT && self.round.as_ref().is_some_and(|r| r.keyed && r.encoder.is_some())
    }

    fn prepare(&mut self, global: &confide_algorithms::Parameters) {
        // The noise does not depend on the data: draw it before training.
        self.noise.prepare(&self.job, global);
    }

    fn contribute_sum(
        &mut self,
        round: u32,
        round_message: &[u8],
        layout: &SumLayout,
        values: &[f64],
    ) -> Result<Envelope, Error> {
        self.round = None;
        if values.len() != layout.values {
            return Err(Error::InvalidInput(format!(
                "{} values for a {} sum of {}",
                values.len(),
                layout.purpose,
                layout.values
            )));
        }
        // Limbs sized for the most parties the job can have: both sides
        // derive the same encoding from the spec alone.
        let encoding = WideSum::new(self.settings.bits, self.job.party_bound())?;
        let config = self.derive_round(round, round_message, encoding.words(layout.values), layout.digest, None)?;
        let input = encoding.encode(values)?;
        self.start(round, config, input)
    }

    fn on_step(&mut self, round: u32, stage: StageName, message: Envelope) -> Result<Envelope, Error> {
        // A step this party cannot take now was asked for out of order.
        self.step(round, stage, message).map_err(|e| match e {
            Error::WrongStage(m) => coordinator_fault(format!("asked for the {stage} step out of order: {m}")),
            other => other,
        })
    }

    fn precompute(&mut self) {
        // While the coordinator collects every party's shares, mask the
        // input with every neighbour that advertised keys; the masked-input
        // step then only removes the masks of neighbours that never shared.
        // premask refuses only an input of the wrong length or range, which
        // the encoding rules out (and the masked-input step would then say so).
        // (A round answered before training premasks nothing: its update
        // comes with the masked-input step, and masks over zeros computed
        // meanwhile would take the cores from the other parties' steps
        // where parties share a machine.)
        if let Some(r) = self.round.as_mut()
            && r.keyed
            && !r.premasked
            && r.encoder.is_none()
            && r.client.premask(std::mem::take(&mut r.input)).is_ok()
        {
            r.premasked = true;
            return;
        }
        // Under distributed DP, once this party's part of a round is done,
        // the next round's noise (data-independent), while the coordinator
        // finishes the round: not earlier, where it would slow the round's
        // own steps.
        if self.round.is_some() {
            return;
        }
        if self.noise.is_empty()
            && let Some(ddg) = self.last_mechanism.take()
        {
            self.noise.draw(&ddg, 1);
            self.last_mechanism = Some(ddg);
        }
    }

    fn abandon(&mut self) {
        self.round = None;
    }
}

impl SecAggClient {
    /// Distributed DP: the round's clip. Fixed by the spec, or under adaptive
    /// clipping the coordinator's (ε does not depend on it: the noise scales
    /// with the clip), within 2^±20 of the spec's first clip.
    fn round_clip(&self, template: &confide_dp::ddg::DdgConfig, round_message: &[u8]) -> Result<f64, Error> {
        if self.job.adaptive_clip.is_none() {
            return Ok(template.clip);
        }
        let rc: wire::RoundConfig = Envelope::body(round_message.to_vec()).decode("coordinator", "round config")?;
        super::accepted_dp_clip(&self.job, template, rc.dp_clip)
    }

    /// The round the coordinator's `round_message` starts, as this party
    /// derives it from the spec it accepted: `dim` words summing `subject`.
    fn derive_round(
        &self,
        round: u32,
        round_message: &[u8],
        dim: usize,
        subject: [u8; 32],
        dp: Option<[u8; 32]>,
    ) -> Result<Config, Error> {
        let rc: wire::RoundConfig = Envelope::body(round_message.to_vec()).decode("coordinator", "round config")?;
        if rc.dim != dim as u64 {
            return Err(coordinator_fault(format!("secure aggregation over {} values; this party sums {dim}", rc.dim)));
        }
        // Refusals, not faults: a coordinator of an earlier version, or one
        // restored with its clock behind, gets nothing signed, and the party
        // stays in the job for later runs.
        if rc.run == 0 {
            return Err(Error::WrongStage(format!(
                "the coordinator started round {round} without a run number (a coordinator older than this party)"
            )));
        }
        // The party list is the coordinator's choice, within what the spec
        // allows. Everything else follows from the spec this party accepted,
        // the model and configuration it was sent: derive it instead of
        // trusting the wire, and bind it into the signatures.
        let revocations = super::check_round_parties(
            &self.job,
            &self.party.name,
            &rc.parties,
            self.job.min_parties.max(MIN_ROUND_PARTIES),
            rc.revocation_version,
            self.party.peers.as_ref(),
        )?;
        let config = round_config(
            &self.job.job_id,
            round,
            &rc.parties,
            dim,
            &self.settings,
            Bound { subject, revocation_version: revocations, dp, run: rc.run },
            &self.job,
        )?;
        let s = &self.settings;
        let mismatch = [
            ("dp", rc.dp_digest == dp.map(|d| d.to_vec()).unwrap_or_default()),
            ("threshold", rc.threshold as usize == config.threshold),
            ("degree", rc.degree as usize == config.degree),
            ("graph_seed", rc.graph_seed == config.graph_seed),
            ("bits", rc.bits == s.bits),
            ("clip", rc.clip.to_bits() == s.clip.to_bits()),
            ("max_examples", rc.max_examples == s.max_examples),
        ];
        if let Some((field, _)) = mismatch.iter().find(|(_, ok)| !ok) {
            return Err(coordinator_fault(format!("sent a round {field} that the job spec does not give")));
        }
        // A run at or below one this party took would let the coordinator
        // collect a second survivor-set signature of this party for the
        // signatures of one run (a round run again keeps its job, round and
        // binding): refuse it before any key is made.
        self.party.released.take_run(&self.job.job_id, rc.run).map_err(|last| {
            Error::WrongStage(format!(
                "the coordinator started run {} of round {round}; this party already took part in run {last} of \
                 this job, and takes only later runs",
                rc.run
            ))
        })?;
        Ok(config)
    }

    /// Starts this party's side of `round` with its encoded `input`; the
    /// answer is its signed round keys.
    fn start(&mut self, round: u32, config: Config, input: Vec<u32>) -> Result<Envelope, Error> {
        let (client, advert) = Client::new(config, &self.party.name, self.party.signer.as_ref(), &mut OsRng)?;
        self.round = Some(ClientRound { round, client, input, encoder: None, keyed: false, premasked: false });
        Ok(Envelope::encode(&keys_to_wire(&advert, &[])))
    }

    fn step(&mut self, round: u32, stage: StageName, message: Envelope) -> Result<Envelope, Error> {
        let max = self.job.max_parties;
        let r = match self.round.as_mut() {
            Some(r) if r.round == round => r,
            _ => return Err(Error::WrongStage(format!("no secure-aggregation round {round} in progress here"))),
        };
        let answer = match stage {
            SHARES => {
                let list: wire::KeyList = message.decode("coordinator", "key list")?;
                if list.keys.len() > max {
                    return Err(coordinator_fault(format!("{} keys; at most {max}", list.keys.len())));
                }
                let mut adverts = Vec::with_capacity(list.keys.len());
                for k in list.keys {
                    let (advert, cert) = keys_from_wire(k, "coordinator")?;
                    self.party.peers.add_peer(&advert.party, &cert).map_err(|e| match e {
                        e @ Error::CertificateLapsed { .. } => e,
                        e => coordinator_fault(format!(
                            "relayed a certificate for {} that does not check: {e}",
                            advert.party
                        )),
                    })?;
                    adverts.push(advert);
                }
                let verifier: &dyn IdentityVerifier = self.party.peers.as_ref();
                let shares = r.client.on_keys(&adverts, verifier, &mut OsRng)?;
                #[cfg(test)]
                let shares = tests::dealer_fault(&self.party.name, shares);
                let signature =
                    self.party.signer.sign(&r.client.config().shares_transcript(&self.party.name, &shares))?;
                r.keyed = true;
                Envelope::encode(&shares_to_wire(&shares, signature))
            }
            MASKED_INPUT => {
                if r.keyed && r.encoder.is_some() {
                    return Err(Error::InvalidInput(format!(
                        "the masked input of round {round} was asked for before this party's update was supplied"
                    )));
                }
                let wire_shares: wire::Shares = message.decode("coordinator", "shares")?;
                let evidence = dealer_evidence(&wire_shares)?;
                let shares = shares_from_wire(wire_shares, "coordinator", max)?;
                let masked = if r.premasked {
                    r.client.on_shares_premasked(&shares)
                } else {
                    r.client.on_shares(&shares, std::mem::take(&mut r.input))
                };
                // A refusal or complaint about a dealer only if every share
                // is the one its dealer signed: otherwise the coordinator
                // altered one, and is named instead (a complaint would hand
                // it the pair's keys for nothing).
                if masked.as_ref().map_or(true, |m| !m.complaints.is_empty()) {
                    check_dealers_signed(&shares, &evidence, r.client.config(), self.party.peers.as_ref())?;
                }
                let masked = masked?;
                let body = complaints_to_wire(&masked.complaints);
                // At the round's b bits on the wire, not a word each.
                let bits = r.client.config().bits;
                let words = if bits == 32 { masked.values } else { crate::secagg::packing::pack(&masked.values, bits) };
                Envelope { body, bulk: Some(Bulk::Words(words)) }
            }
            CONSISTENCY => {
                let req: wire::Survivors = message.decode("coordinator", "survivor set")?;
                if req.survivors.len() > max {
                    return Err(coordinator_fault(format!("{} survivors; at most {max}", req.survivors.len())));
                }
                let sig = r.client.on_survivors(&req.survivors, self.party.signer.as_ref())?;
                Envelope::encode(&wire::SurvivorSignature {
                    party: sig.party,
                    signature: sig.signature,
                    certificate: Vec::new(),
                })
            }
            UNMASK => {
                let req: wire::UnmaskRequest = message.decode("coordinator", "unmask request")?;
                if req.survivors.len() > max || req.signatures.len() > max {
                    return Err(coordinator_fault(format!("an unmask request of more than {max} names")));
                }
                let mut signatures = Vec::with_capacity(req.signatures.len());
                for s in req.signatures {
                    if s.signature.len() > MAX_SIGNATURE || s.certificate.len() > MAX_CERTIFICATE {
                        return Err(coordinator_fault(format!("an oversized signature or certificate of {}", s.party)));
                    }
                    if s.party != self.party.name {
                        self.party.peers.add_peer(&s.party, &s.certificate).map_err(|e| match e {
                            e @ Error::CertificateLapsed { .. } => e,
                            e => coordinator_fault(format!(
                                "relayed a certificate for {} that does not check: {e}",
                                s.party
                            )),
                        })?;
                    }
                    signatures.push(SurvivorSignature { party: s.party, signature: s.signature });
                }
                let verifier: &dyn IdentityVerifier = self.party.peers.as_ref();
                let answer = r.client.on_unmask(&UnmaskRequest { survivors: req.survivors, signatures }, verifier)?;
                self.round = None;
                Envelope::encode(&unmask_shares_to_wire(&answer))
            }
            other => return Err(coordinator_fault(format!("sent a {other} step, which secagg does not have"))),
        };
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::Aggregate;
    use crate::secagg::testing::{InsecureTagVerifier, identity};
    use confide_algorithms::{FitConfig, Parameters, Tensor, TrainConfig};

    fn fit() -> FitConfig {
        FitConfig { round: 1, train: TrainConfig::default() }
    }

    fn server(table: &toml::Table, job: &JobFacts) -> Box<dyn AggregationServer> {
        SecAggPlus.server(table, job, Box::new(InsecureTagVerifier)).unwrap()
    }

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    fn facts(n: usize) -> JobFacts {
        JobFacts::new("job", names(n), 100, 3, 1000)
    }

    /// A round's threshold counts the federation's colluders (⌊γN⌋ of the
    /// N named parties), not only ⌊γn⌋ of its own n: 20 named parties at
    /// γ = 0.3 and a round of 12 get t = 10 (2t − n = 8 > 6), as both the
    /// coordinator and every party derive it; the spec is checked at its
    /// smallest round with the same count.
    #[test]
    fn a_rounds_threshold_counts_the_federations_colluders() {
        let table: toml::Table = toml::from_str("corrupt_fraction = 0.3\ndropout_fraction = 0.0\n").unwrap();
        let s = SecAggSettings::from_table(&table).unwrap();
        let job = JobFacts::new("job", names(20), 100, 11, 1000);
        let bound = Bound { subject: [0; 32], revocation_version: 0, dp: None, run: 1 };
        let config = round_config("job", 1, &names(12), 4, &s, bound, &job).unwrap();
        assert_eq!(config.threshold, 10);
        assert!(2 * config.threshold - 12 > 6);
        // A spec whose smallest round cannot hold the federation's
        // colluders is refused when it is checked.
        let small = JobFacts::new("job", names(20), 100, 8, 1000);
        let problems = s.check(&small);
        assert!(problems.iter().any(|p| p.message.contains("8 parties cannot tolerate 6 corrupt")), "{problems:?}");
        assert!(s.check(&job).is_empty(), "{:?}", s.check(&job));
        // Seven named parties at γ = 0.15 (one colluder) and δ = 0.2, min 4:
        // rounds of 4 and 7 have parameters, one of 5 does not (t = 4 with
        // three neighbours left after a dropout); every size is checked.
        let table: toml::Table = toml::from_str("corrupt_fraction = 0.15\ndropout_fraction = 0.2\n").unwrap();
        let s = SecAggSettings::from_table(&table).unwrap();
        let seven = JobFacts::new("job", names(7), 100, 4, 1000);
        let problems = s.check(&seven);
        assert!(problems.iter().any(|p| p.message.contains("5 parties cannot tolerate")), "{problems:?}");
    }

    /// A server that has begun round 1 of `n` parties on a one-weight model.
    struct Begun {
        job: JobFacts,
        names: Vec<String>,
        global: Parameters,
        fit: FitConfig,
        server: Box<dyn AggregationServer>,
        round_message: Vec<u8>,
    }

    fn begun_round(n: usize) -> Begun {
        let (job, names, global, fit) = (facts(n), names(n), params(&[0.0]), fit());
        let mut server = server(&toml::Table::new(), &job);
        let round_message =
            server.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) }).unwrap();
        Begun { job, names, global, fit, server, round_message }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    /// Every party's client, in party order.
    type Clients = Vec<Box<dyn AggregationClient>>;
    /// Messages to parties, by party.
    type ToParties = Vec<(String, Envelope)>;

    /// A round of `n` parties after every party advertised its keys: the
    /// parties' clients, the coordinator, and its key lists (the
    /// secagg-shares messages), one per party.
    fn keyed(n: usize) -> (Clients, Box<dyn AggregationServer>, ToParties) {
        let Begun { job, names, global, fit, mut server, round_message: rm } = begun_round(n);
        let mut clients: Vec<_> =
            names.iter().map(|p| SecAggPlus.client(&toml::Table::new(), &job, identity(p)).unwrap()).collect();
        for (i, c) in clients.iter_mut().enumerate() {
            let update =
                LocalUpdate { global: &global, fit: &fit, local: params(&[0.1]), num_examples: 5, train_loss: None };
            let m = c.contribute(1, &rm, update).unwrap();
            server.on_message(Peer { name: &names[i], certificate: &[], relay: None }, m).unwrap();
        }
        let Progress::Step { messages: Messages::PerParty(lists), .. } = server.close_stage().unwrap() else {
            panic!()
        };
        (clients, server, lists)
    }

    /// [`keyed`], then every party deals its shares: the clients and the
    /// coordinator's secagg-masked-input messages (each holder's shares).
    fn to_masked_input(n: usize) -> (Clients, ToParties) {
        let (mut clients, mut server, lists) = keyed(n);
        for (p, list) in lists {
            let i: usize = p[1..].parse().unwrap();
            let answer = clients[i].on_step(1, SHARES, list).unwrap();
            server.on_message(Peer { name: &p, certificate: &[], relay: None }, answer).unwrap();
        }
        let Progress::Step { stage, messages: Messages::PerParty(to_holders), .. } = server.close_stage().unwrap()
        else {
            panic!()
        };
        assert_eq!(stage, MASKED_INPUT);
        (clients, to_holders)
    }

    /// Runs a round of `n` parties through the two sides, with `drop_at`
    /// parties vanishing before the masked input.
    /// Σ nᵢ·Δᵢ, Σ nᵢ, the mean loss, the contributors.
    type Outcome = (Vec<f64>, f64, Option<f64>, Vec<String>);

    fn run(n: usize, drop: &[usize]) -> Result<Outcome, Error> {
        run_with(&toml::toml! { max_examples = 100 }, n, drop)
    }

    /// [`run`] with the aggregation settings `table`.
    fn run_with(table: &toml::Table, n: usize, drop: &[usize]) -> Result<Outcome, Error> {
        match run_aggregate(table, n, drop)? {
            Aggregate::WeightedSum { weighted_delta_sum, total_examples, mean_train_loss, contributors, .. } => {
                Ok((weighted_delta_sum, total_examples, mean_train_loss, contributors))
            }
            other => panic!("secagg reveals only a sum: {other:?}"),
        }
    }

    /// [`run_with`]'s aggregate, whole.
    fn run_aggregate(table: &toml::Table, n: usize, drop: &[usize]) -> Result<Aggregate, Error> {
        let job = facts(n);
        let names = names(n);
        let global = params(&[0.5, -0.5]);
        let fit = fit();
        let mut server = SecAggPlus.server(table, &job, Box::new(InsecureTagVerifier))?;
        let mut clients: Vec<_> = names.iter().map(|p| SecAggPlus.client(table, &job, identity(p)).unwrap()).collect();
        let rm = server.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) })?;
        for (i, c) in clients.iter_mut().enumerate() {
            let local = params(&[0.5 + i as f32 * 0.1, -0.5]);
            let (num_examples, train_loss) = (10 * (i as u64 + 1), Some(i as f64 + 1.0));
            let update = LocalUpdate { global: &global, fit: &fit, local, num_examples, train_loss };
            let m = c.contribute(1, &rm, update)?;
            server.on_message(Peer { name: &names[i], certificate: &[], relay: None }, m)?;
        }
        drive(server.as_mut(), &mut clients, 1, drop)
    }

    /// Runs the protocol's steps after the parties' contributions, parties
    /// in `drop` vanishing before the masked input.
    fn drive(
        server: &mut dyn AggregationServer,
        clients: &mut [Box<dyn AggregationClient>],
        round: u32,
        drop: &[usize],
    ) -> Result<Aggregate, Error> {
        let mut progress = server.close_stage()?;
        loop {
            match progress {
                Progress::Done(aggregate) => return Ok(aggregate),
                Progress::Step { stage, messages, .. } => {
                    let msgs = match messages {
                        Messages::PerParty(v) => v,
                        Messages::Same { to, message } => to.into_iter().map(|p| (p, message.clone())).collect(),
                    };
                    for (p, m) in msgs {
                        let i: usize = p[1..].parse().unwrap();
                        if stage == MASKED_INPUT && drop.contains(&i) {
                            continue;
                        }
                        let answer = clients[i].on_step(round, stage, m)?;
                        server.on_message(Peer { name: &p, certificate: &[], relay: None }, answer)?;
                    }
                    progress = server.close_stage()?;
                }
            }
        }
    }

    /// Setup statistics and evaluations travel through the same protocol:
    /// the coordinator learns their sums, exactly, and no party's values.
    #[test]
    fn statistics_are_summed_exactly_with_dropouts() {
        let n = 5;
        let job = facts(n);
        let names = names(n);
        let layout = SumLayout::feature_stats(2);
        let mut server = server(&toml::Table::new(), &job);
        let rm = server.begin_sum(&SumRound { round: 0, parties: &names, layout: &layout }).unwrap();
        let mut clients: Vec<_> =
            names.iter().map(|p| SecAggPlus.client(&toml::Table::new(), &job, identity(p)).unwrap()).collect();
        let values = |i: usize| vec![10.0 * (i + 1) as f64, -3.25 * i as f64, 1e6 + i as f64, 0.5, 7e9];
        for (i, c) in clients.iter_mut().enumerate() {
            let m = c.contribute_sum(0, &rm, &layout, &values(i)).unwrap();
            server.on_message(Peer { name: &names[i], certificate: &[], relay: None }, m).unwrap();
        }
        let Aggregate::Sum { sums, contributors, .. } = drive(server.as_mut(), &mut clients, 0, &[2]).unwrap() else {
            panic!("a statistics round ends in a sum")
        };
        assert_eq!(contributors, ["p0", "p1", "p3", "p4"]);
        for (j, got) in sums.iter().enumerate() {
            let exact: f64 = [0, 1, 3, 4].iter().map(|&i| values(i)[j]).sum();
            assert!((got - exact).abs() < 1e-4, "value {j}: {got} vs {exact}");
        }
    }

    /// A coordinator that asks one party to evaluate another model than the
    /// others (to read that party's metrics off the sum) cannot complete the
    /// round: the evaluated model is bound into the signed keys.
    #[test]
    fn an_evaluation_of_different_models_cannot_complete() {
        let job = facts(3);
        let names = names(3);
        let (global, other) = (params(&[0.0]), params(&[9.0]));
        let mut coordinator = server(&toml::Table::new(), &job);
        let layout = SumLayout::evaluation(&global);
        let rm = coordinator.begin_sum(&SumRound { round: 2, parties: &names, layout: &layout }).unwrap();
        let mut p0 = SecAggPlus.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let values = [10.0, 5.0, 10.0, 9.0, 10.0, 0.0, 0.0];
        let advert = p0.contribute_sum(2, &rm, &SumLayout::evaluation(&other), &values).unwrap();
        let err =
            coordinator.on_message(Peer { name: "p0", certificate: &[], relay: None }, advert.clone()).unwrap_err();
        assert!(matches!(&err, Error::PeerMisbehaved { party, .. } if party == "p0"), "{err}");
        // A malicious coordinator relays p0's keys anyway: p1, evaluating the
        // model the round names, refuses and names the coordinator.
        let mut p1 = SecAggPlus.client(&toml::Table::new(), &job, identity("p1")).unwrap();
        let mut p2 = SecAggPlus.client(&toml::Table::new(), &job, identity("p2")).unwrap();
        let adverts = [
            advert,
            p1.contribute_sum(2, &rm, &layout, &values).unwrap(),
            p2.contribute_sum(2, &rm, &layout, &values).unwrap(),
        ];
        let keys: Vec<wire::Keys> =
            adverts.iter().map(|a| prost::Message::decode(a.body.as_slice()).unwrap()).collect();
        let err = p1.on_step(2, SHARES, Envelope::encode(&wire::KeyList { keys })).unwrap_err();
        assert!(
            matches!(&err, Error::PeerMisbehaved { party, reason } if party == "coordinator" && reason.contains("p0")),
            "{err}"
        );
        // A sum of another length is refused before anything is sent.
        let err = p0.contribute_sum(2, &rm, &layout, &values[..3]).unwrap_err().to_string();
        assert!(err.contains("3 values"), "{err}");
        // Plaintext protocols have no secure sums.
        let mut plain =
            crate::aggregation::plain::Plain.server(&toml::Table::new(), &job, Box::new(InsecureTagVerifier)).unwrap();
        assert!(plain.begin_sum(&SumRound { round: 2, parties: &names, layout: &layout }).is_err());
    }

    /// Below 32 bits the masked inputs travel packed at the round's width
    /// (`secagg::packing`): the same sums come out, with the fixed point's
    /// coarser step at fewer bits.
    #[test]
    fn rounds_below_32_bits_sum_through_packed_masked_inputs() {
        for bits in [20i64, 24, 31] {
            let table = toml::toml! { max_examples = 100 bits = bits };
            let (sum, total, _, who) = run_with(&table, 5, &[1]).unwrap();
            assert_eq!(who, ["p0", "p2", "p3", "p4"], "{bits} bits");
            assert_eq!(total, 130.0, "{bits} bits");
            assert!((sum[0] - 38.0).abs() < 0.1 && sum[1].abs() < 0.1, "{bits} bits: {sum:?}");
        }
    }

    /// A masked input not packed at the round's width (here a word per
    /// value in a 24-bit round, or a stray bit past the last value) is
    /// refused, naming its sender.
    #[test]
    fn a_masked_input_packed_otherwise_is_refused_naming_its_sender() {
        let table = toml::toml! { max_examples = 100 bits = 24 };
        let (job, names, global, fit) = (facts(4), names(4), params(&[0.5, -0.5]), fit());
        let mut server = SecAggPlus.server(&table, &job, Box::new(InsecureTagVerifier)).unwrap();
        let mut clients: Vec<_> = names.iter().map(|p| SecAggPlus.client(&table, &job, identity(p)).unwrap()).collect();
        let rm =
            server.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) }).unwrap();
        for (i, c) in clients.iter_mut().enumerate() {
            let update = LocalUpdate {
                global: &global,
                fit: &fit,
                local: params(&[0.6, -0.5]),
                num_examples: 5,
                train_loss: None,
            };
            let m = c.contribute(1, &rm, update).unwrap();
            server.on_message(Peer { name: &names[i], certificate: &[], relay: None }, m).unwrap();
        }
        let mut progress = server.close_stage().unwrap();
        loop {
            let Progress::Step { stage, messages: Messages::PerParty(msgs), .. } = progress else { panic!() };
            for (p, m) in msgs {
                let i: usize = p[1..].parse().unwrap();
                let answer = clients[i].on_step(1, stage, m).unwrap();
                if stage == MASKED_INPUT && i < 2 {
                    let Some(Bulk::Words(words)) = answer.bulk else { panic!("masked words") };
                    // The round's vector: the model's two values and the
                    // three trailing words (weight, loss, loss weight).
                    let dim = 2 + 3;
                    let bad = if i == 0 {
                        // A word per value, as at 32 bits.
                        crate::secagg::packing::unpack(words, dim, 24).unwrap()
                    } else {
                        let mut w = words;
                        *w.last_mut().unwrap() |= 1 << 31;
                        w
                    };
                    let e = server
                        .on_message(
                            Peer { name: &p, certificate: &[], relay: None },
                            Envelope { body: Vec::new(), bulk: Some(Bulk::Words(bad)) },
                        )
                        .unwrap_err();
                    assert!(
                        matches!(&e, Error::PeerMisbehaved { party, reason } if *party == p && reason.contains("not packed")),
                        "{e}"
                    );
                    continue;
                }
                server.on_message(Peer { name: &p, certificate: &[], relay: None }, answer).unwrap();
            }
            if stage == MASKED_INPUT {
                break;
            }
            progress = server.close_stage().unwrap();
        }
    }

    #[test]
    fn the_two_sides_compute_the_weighted_delta_sum_with_dropouts() {
        let (sum, total, loss, who) = run(5, &[1]).unwrap();
        // The example-weighted mean loss of the survivors, not any party's:
        // (10·1 + 30·3 + 40·4 + 50·5) / 130.
        assert!((loss.unwrap() - 510.0 / 130.0).abs() < 1e-3, "{loss:?}");
        assert_eq!(who, ["p0", "p2", "p3", "p4"]);
        assert_eq!(total, 10.0 + 30.0 + 40.0 + 50.0);
        // Σ nᵢ·Δᵢ for the first value: 10·0 + 30·0.2 + 40·0.3 + 50·0.4 = 38
        assert!((sum[0] - 38.0).abs() < 1e-3, "{sum:?}");
        assert!(sum[1].abs() < 1e-3);
    }

    #[test]
    fn settings_are_validated_by_field() {
        let p = SecAggPlus.validate(&toml::toml! { threshold = 0.4 bits = 40 clip = -1.0 }, &facts(3));
        let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["threshold", "bits", "clip"]);
        let p = SecAggPlus.validate(&toml::toml! { colour = 1 }, &facts(3));
        assert!(p[0].message.contains("colour"), "{p:?}");
        let p = SecAggPlus.validate(&toml::Table::new(), &JobFacts { min_parties: 2, ..facts(3) });
        assert_eq!((p[0].field.as_str(), p[0].absolute), ("parties.min", true));
        assert_eq!(SecAggSettings::from_table(&toml::Table::new()).unwrap(), SecAggSettings::default());
    }

    #[test]
    fn a_party_refuses_round_parameters_the_spec_does_not_give() {
        let job = facts(4);
        let names = names(4);
        let (global, fit) = (params(&[0.0]), fit());
        let mut server = server(&toml::Table::new(), &job);
        let info = RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) };
        let honest = server.begin_round(&info).unwrap();
        let good: wire::RoundConfig = prost::Message::decode(honest.as_slice()).unwrap();
        // Four parties, complete graph: t = ⌊4/2⌋ + 1, a majority.
        assert_eq!((good.degree, good.threshold), (3, 3));
        for (field, tamper) in [
            ("threshold", wire::RoundConfig { threshold: 2, ..good.clone() }),
            ("degree", wire::RoundConfig { degree: 2, ..good.clone() }),
            ("graph_seed", wire::RoundConfig { graph_seed: vec![7; 32], ..good.clone() }),
            ("max_examples", wire::RoundConfig { max_examples: 7, ..good.clone() }),
            ("bits", wire::RoundConfig { bits: 16, ..good.clone() }),
            ("clip", wire::RoundConfig { clip: 100.0, ..good.clone() }),
            (
                "does not name",
                wire::RoundConfig { parties: ["p0", "p1", "p2", "sybil"].map(String::from).to_vec(), ..good.clone() },
            ),
            ("at least 3", wire::RoundConfig { parties: names[..2].to_vec(), ..good.clone() }),
            (
                "not sorted and unique",
                wire::RoundConfig { parties: names.iter().rev().cloned().collect(), ..good.clone() },
            ),
            (
                "not sorted and unique",
                wire::RoundConfig { parties: ["p0", "p1", "p1", "p2"].map(String::from).to_vec(), ..good.clone() },
            ),
            ("this party sums", wire::RoundConfig { dim: good.dim + 1, ..good.clone() }),
            ("without this party", wire::RoundConfig { parties: names[1..].to_vec(), ..good.clone() }),
        ] {
            let mut client = SecAggPlus.client(&toml::Table::new(), &job, identity("p0")).unwrap();
            let update =
                LocalUpdate { global: &global, fit: &fit, local: params(&[0.1]), num_examples: 5, train_loss: None };
            let err = client.contribute(1, &prost::Message::encode_to_vec(&tamper), update).unwrap_err().to_string();
            assert!(err.contains("party coordinator misbehaved") && err.contains(field), "{field}: {err}");
        }
        let mut client = SecAggPlus.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        let update =
            LocalUpdate { global: &global, fit: &fit, local: params(&[0.1]), num_examples: 5, train_loss: None };
        client.contribute(1, &honest, update).unwrap();
    }

    /// A round run again gets a new run number, and what a party signed in
    /// one run does not verify in another. A coordinator that ran round 1
    /// once (everyone signed the full survivor set) and runs it again cannot
    /// count the first run's signatures in the second to have shares
    /// revealed (were they counted, it would need only this party's own
    /// signature in the second run); and a party refuses a run at or below
    /// one it took part in, also in a new session of the job (the
    /// coordinator offered it again).
    #[test]
    fn a_survivor_set_signed_in_one_run_of_a_round_does_not_count_in_another() {
        let n = 4;
        let (job, names, global, fit) = (facts(n), names(n), params(&[0.0]), fit());
        let mut server = server(&toml::Table::new(), &job);
        let p0 = identity("p0");
        let p0_released = p0.released.clone();
        let mut clients: Clients = std::iter::once(p0)
            .chain(names[1..].iter().map(|p| identity(p)))
            .map(|id| SecAggPlus.client(&toml::Table::new(), &job, id).unwrap())
            .collect();
        let info = RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) };
        let update =
            || LocalUpdate { global: &global, fit: &fit, local: params(&[0.1]), num_examples: 5, train_loss: None };
        // Every party contributes to the run `rm` starts and answers each
        // step up to the unmask step; its requests, by party.
        let to_unmask = |server: &mut dyn AggregationServer, clients: &mut Clients, rm: &[u8]| -> ToParties {
            for (p, c) in names.iter().zip(clients.iter_mut()) {
                let m = c.contribute(1, rm, update()).unwrap();
                server.on_message(Peer { name: p, certificate: &[], relay: None }, m).unwrap();
            }
            let mut progress = server.close_stage().unwrap();
            loop {
                let Progress::Step { stage, messages, .. } = progress else {
                    panic!("the round ended before unmasking")
                };
                let msgs = match messages {
                    Messages::PerParty(v) => v,
                    Messages::Same { to, message } => to.into_iter().map(|p| (p, message.clone())).collect(),
                };
                if stage == UNMASK {
                    return msgs;
                }
                for (p, m) in msgs {
                    let i: usize = p[1..].parse().unwrap();
                    let answer = clients[i].on_step(1, stage, m).unwrap();
                    server.on_message(Peer { name: &p, certificate: &[], relay: None }, answer).unwrap();
                }
                progress = server.close_stage().unwrap();
            }
        };
        let first_message = server.begin_round(&info).unwrap();
        let first = to_unmask(server.as_mut(), &mut clients, &first_message);
        // The coordinator abandons the first run, and sends it again:
        // refused (not a fault: the party stays in the job, signing nothing).
        let e = clients[0].contribute(1, &first_message, update()).unwrap_err();
        assert!(matches!(&e, Error::WrongStage(m) if m.contains("already took part in run")), "{e}");
        // Likewise after the job is offered again: a new session's client.
        let again = PartyIdentity { released: p0_released, ..identity("p0") };
        let mut reoffered = SecAggPlus.client(&toml::Table::new(), &job, again).unwrap();
        let e = reoffered.contribute(1, &first_message, update()).unwrap_err().to_string();
        assert!(e.contains("already took part in run"), "{e}");
        let second_message = server.begin_round(&info).unwrap();
        let second = to_unmask(server.as_mut(), &mut clients, &second_message);
        let request = |msgs: &ToParties| -> wire::UnmaskRequest {
            msgs.iter().find(|(p, _)| p == "p0").unwrap().1.decode("coordinator", "unmask request").unwrap()
        };
        let (old, honest) = (request(&first), request(&second));
        assert_eq!(old.survivors, honest.survivors, "both runs' survivor set is every party");
        // p0's own signature from the second run, the others' from the first.
        let mut replayed = honest.clone();
        for s in &mut replayed.signatures {
            if s.party != "p0" {
                *s = old.signatures.iter().find(|o| o.party == s.party).unwrap().clone();
            }
        }
        let e = clients[0].on_step(1, UNMASK, Envelope::encode(&replayed)).unwrap_err().to_string();
        assert!(e.contains("party coordinator misbehaved") && e.contains("does not verify over this set"), "{e}");
        // The second run's own signatures are what p0 answers.
        clients[0].on_step(1, UNMASK, Envelope::encode(&honest)).unwrap();
    }

    /// A coordinator that has not applied a revocation (or claims an older
    /// list) cannot start a round with a party that has: the version is
    /// compared and bound into the signatures.
    #[test]
    fn a_round_is_bound_to_the_revocation_list_version() {
        use crate::secagg::testing::{InsecureTagSigner, VersionedTagVerifier};
        let job = facts(3);
        let names = names(3);
        let (global, fit) = (params(&[0.0]), fit());
        let mut stale = SecAggPlus.server(&toml::Table::new(), &job, Box::new(VersionedTagVerifier(1))).unwrap();
        let rm = stale.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) }).unwrap();
        let party = PartyIdentity {
            name: "p0".into(),
            signer: std::sync::Arc::new(InsecureTagSigner("p0".into())),
            peers: Box::new(VersionedTagVerifier(2)),
            released: Default::default(),
        };
        let mut client = SecAggPlus.client(&toml::Table::new(), &job, party).unwrap();
        let update =
            LocalUpdate { global: &global, fit: &fit, local: params(&[0.1]), num_examples: 5, train_loss: None };
        let err = client.contribute(1, &rm, update).unwrap_err().to_string();
        assert!(err.contains("coordinator") && err.contains("revocation list version 1"), "{err}");
    }

    /// A malicious coordinator gives p0 another model (or learning rate) than
    /// the others, to read p0's update off the sum (Pasquini et al., CCS
    /// 2022). p0's keys are signed over what p0 was given, so an honest
    /// coordinator drops p0 by name, and a malicious one that relays the keys
    /// anyway is named by every neighbour.
    #[test]
    fn parties_given_different_models_or_configurations_cannot_complete_a_round() {
        let job = facts(4);
        let names = names(4);
        let (global, fit) = (params(&[0.0, 0.0]), fit());
        let mut coordinator = server(&toml::Table::new(), &job);
        let info = RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) };
        let rm = coordinator.begin_round(&info).unwrap();
        let other_model = params(&[5.0, 5.0]);
        let lr_zero = FitConfig { train: TrainConfig { learning_rate: 0.0, ..fit.train.clone() }, ..fit.clone() };
        for (what, g, f) in [("model", &other_model, &fit), ("configuration", &global, &lr_zero)] {
            let mut clients: Vec<_> =
                names.iter().map(|p| SecAggPlus.client(&toml::Table::new(), &job, identity(p)).unwrap()).collect();
            let mut adverts = Vec::new();
            for (i, c) in clients.iter_mut().enumerate() {
                let (gi, fi) = if i == 0 { (g, f) } else { (&global, &fit) };
                let update =
                    LocalUpdate { global: gi, fit: fi, local: params(&[0.1, 0.2]), num_examples: 5, train_loss: None };
                adverts.push(c.contribute(1, &rm, update).unwrap());
            }
            let mut honest = server(&toml::Table::new(), &job);
            honest.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) }).unwrap();
            let err =
                honest.on_message(Peer { name: "p0", certificate: &[], relay: None }, adverts[0].clone()).unwrap_err();
            assert!(matches!(&err, Error::PeerMisbehaved { party, .. } if party == "p0"), "{what}: {err}");
            // Relayed anyway: p1 refuses the stage and names the coordinator.
            let keys: Vec<wire::Keys> =
                adverts.iter().map(|a| prost::Message::decode(a.body.as_slice()).unwrap()).collect();
            let list = Envelope::encode(&wire::KeyList { keys });
            let err = clients[1].on_step(1, SHARES, list).unwrap_err();
            assert!(
                matches!(&err, Error::PeerMisbehaved { party, reason } if party == "coordinator" && reason.contains("p0")),
                "{what}: {err}"
            );
        }
    }

    /// Party-level DP with distributed noise for `n` parties of which the
    /// spec counts `honest` on, at noise multiplier `z` and clip 1.
    fn noisy_facts(n: usize, honest: usize, z: f64) -> JobFacts {
        let template = confide_dp::ddg::DdgConfig {
            clip: 1.0,
            noise_multiplier: z,
            dim: confide_dp::ddg::MAX_PADDED_DIM,
            bits: 32,
            max_parties: n,
            honest_parties: honest,
            beta: (-0.5f64).exp(),
            k_stddevs: 4.0,
        };
        JobFacts { distributed_dp: Some(template), ..facts(n) }
    }

    /// A model with a frozen input standardisation (3 values) and 4,000
    /// trained ones.
    fn model(w: impl Fn(usize) -> f32) -> Parameters {
        Parameters::new(vec![
            Tensor { name: confide_algorithms::trainer::INPUT_STD.into(), shape: vec![3], data: vec![1.0; 3] },
            Tensor { name: "w".into(), shape: vec![4000], data: (0..4000).map(w).collect() },
        ])
        .unwrap()
    }

    /// A round of distributed DP: each party's local model from `local`,
    /// parties in `drop` vanishing before the masked input. The decoded sum,
    /// its weight, the contributors and the round's mechanism.
    fn run_noisy(
        job: &JobFacts,
        local: impl Fn(usize) -> Parameters,
        drop: &[usize],
    ) -> (Vec<f64>, f64, Vec<String>, NoisyUpdate) {
        let names = names(job.party_names.len());
        let (global, fit) = (model(|_| 0.0), fit());
        let table = toml::Table::new();
        let mut server = server(&table, job);
        let rm =
            server.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) }).unwrap();
        let mut clients: Vec<_> = names.iter().map(|p| SecAggPlus.client(&table, job, identity(p)).unwrap()).collect();
        for (i, c) in clients.iter_mut().enumerate() {
            c.prepare(&global);
            let update = LocalUpdate { global: &global, fit: &fit, local: local(i), num_examples: 1, train_loss: None };
            let m = c.contribute(1, &rm, update).unwrap();
            server.on_message(Peer { name: &names[i], certificate: &[], relay: None }, m).unwrap();
        }
        let mechanism = NoisyUpdate::new(job.distributed_dp.as_ref().unwrap(), &job.job_id, 1, &global).unwrap();
        match drive(server.as_mut(), &mut clients, 1, drop).unwrap() {
            Aggregate::WeightedSum { weighted_delta_sum, total_examples, mean_train_loss, contributors, .. } => {
                assert_eq!(mean_train_loss, None, "no loss travels under DP");
                (weighted_delta_sum, total_examples, contributors, mechanism)
            }
            other => panic!("secagg reveals only a sum: {other:?}"),
        }
    }

    /// With (almost) no noise the coordinator gets Σ clip(Δᵢ): small updates
    /// whole, a huge one cut to the clip, the frozen tensor untouched, each
    /// party weighing 1.
    #[test]
    fn distributed_dp_sums_each_partys_clipped_update() {
        let job = noisy_facts(4, 3, 1e-4);
        let small = |i: usize| move |j: usize| 0.001 * ((j * 7 + i) % 5) as f32;
        let local = |i: usize| if i == 3 { model(|_| 1000.0) } else { model(small(i)) };
        let (sum, total, contributors, m) = run_noisy(&job, local, &[]);
        assert_eq!((total, contributors.len()), (4.0, 4));
        assert_eq!(&sum[..3], &[0.0; 3], "the frozen standardisation gets no noise");
        // The huge update, clipped to norm 1: 1/√4000 per value.
        let clipped = 1.0 / 4000f64.sqrt();
        let slack = 4.0 * 4.0 / m.mechanism().scale() + 1e-3;
        for j in 0..4000 {
            let want: f64 = (0..3).map(|i| f64::from(small(i)(j))).sum::<f64>() + clipped;
            assert!((sum[3 + j] - want).abs() < slack, "value {j}: {} vs {want}", sum[3 + j]);
        }
    }

    /// The noise in the unmasked sum has the calibrated variance — each
    /// survivor's σ², so z²·c²·survivors/honest in all — with every party
    /// and with one dropped (four survivors, the fewest secagg's threshold
    /// lets five parties unmask). The honest parties the spec counts
    /// (`parties.min` less ⌊γN⌋ corrupt: 3) carry (z·c)² between them, and
    /// the measured sum at least that; noise calibrated for all five
    /// parties would leave four survivors 4/5 of it.
    #[test]
    fn distributed_noise_in_the_unmasked_sum_has_the_calibrated_variance() {
        let z = 0.5;
        let n = 5;
        let base = facts(n);
        let tm = SecAggSettings::from_table(&toml::Table::new()).unwrap().threat_model();
        let honest = base.min_parties - params::corrupt_parties(n, &tm);
        assert_eq!(honest, 3, "min 3 of 5, none corrupt at γ = 0.05");
        let job = noisy_facts(n, honest, z);
        for drop in [&[][..], &[2][..]] {
            let (sum, total, _, m) = run_noisy(&job, |_| model(|_| 0.0), drop);
            let survivors = (n - drop.len()) as f64;
            assert_eq!(total, survivors);
            let var = sum[3..].iter().map(|v| v * v).sum::<f64>() / 4000.0;
            let want = survivors * (f64::from(m.mechanism().local_sigma()) / m.mechanism().scale()).powi(2);
            // 4,000 values: the sample variance's relative sd is 2.2%; 12% is
            // 5.4 sd (fresh OS noise each run: a false alarm below 10^-7).
            assert!((var / want - 1.0).abs() < 0.12, "dropped {drop:?}: variance {var}, calibrated {want}");
            let honest_share = honest as f64 * (f64::from(m.mechanism().local_sigma()) / m.mechanism().scale()).powi(2);
            assert!(honest_share >= (z * 1.0f64).powi(2) * (1.0 - 1e-9), "{honest_share}");
            // What the survivors' sum carries, measured: at least (z·c)²
            // (within the sample's 5.4 s.d.).
            assert!(var >= (z * 1.0f64).powi(2) * 0.88, "dropped {drop:?}: variance {var} below (z·c)²");
        }
    }

    /// Adaptive clipping: updates of norm 0.1 all fit a first clip of 1, so
    /// the noisy count says so and the clip shrinks by e^{−η(1−γ)} a round
    /// towards the median norm; a party refuses a clip far off the spec's.
    #[test]
    fn adaptive_clipping_moves_the_clip_towards_the_target_quantile() {
        let adaptive = confide_dp::ddg::AdaptiveClip { target_quantile: 0.5, learning_rate: 0.5, count_stddev: 0.01 };
        let job = JobFacts { adaptive_clip: Some(adaptive), ..noisy_facts(3, 3, 1e-3) };
        let names = names(3);
        let (global, fit) = (model(|_| 0.0), fit());
        let table = toml::Table::new();
        let mut coordinator = server(&table, &job);
        let mut clients: Vec<_> = names.iter().map(|p| SecAggPlus.client(&table, &job, identity(p)).unwrap()).collect();
        let small = 0.1 / 4000f32.sqrt();
        let mut clips = Vec::new();
        for round in 1..=3 {
            let info = RoundInfo { round, parties: &names, global: &global, fit: Some(&fit) };
            let rm = coordinator.begin_round(&info).unwrap();
            let rc: wire::RoundConfig = prost::Message::decode(rm.as_slice()).unwrap();
            clips.push(rc.dp_clip);
            for (i, c) in clients.iter_mut().enumerate() {
                let update = LocalUpdate {
                    global: &global,
                    fit: &fit,
                    local: model(|_| small),
                    num_examples: 1,
                    train_loss: None,
                };
                let m = c.contribute(round, &rm, update).unwrap();
                coordinator.on_message(Peer { name: &names[i], certificate: &[], relay: None }, m).unwrap();
            }
            let Aggregate::WeightedSum { weighted_delta_sum, .. } =
                drive(coordinator.as_mut(), &mut clients, round, &[]).unwrap()
            else {
                panic!("a sum")
            };
            // The updates themselves pass whole (the count is not in them).
            assert_eq!(weighted_delta_sum.len(), 4003);
            // (Noise 10^-3 a value: their mean is within 10^-4 of 3 × 0.1/√4000.)
            let mean = weighted_delta_sum[3..].iter().sum::<f64>() / 4000.0;
            assert!((mean - 3.0 * f64::from(small)).abs() < 1e-4, "{mean}");
        }
        assert_eq!(clips[0], 1.0);
        for w in clips.windows(2) {
            assert!((w[1] / w[0] - (-0.25f64).exp()).abs() < 0.01, "{clips:?}");
        }
        // The clip is checkpointed: a coordinator restored from the state
        // starts the next round where this one would.
        let saved = coordinator.state();
        let mut resumed = server(&table, &job);
        resumed.restore(&saved).unwrap();
        let info = RoundInfo { round: 4, parties: &names, global: &global, fit: Some(&fit) };
        let (a, b) = (coordinator.begin_round(&info).unwrap(), resumed.begin_round(&info).unwrap());
        let decode = |m: &[u8]| -> wire::RoundConfig { prost::Message::decode(m).unwrap() };
        let (rc, resumed_rc) = (decode(&a), decode(&b));
        // The same round, numbered above the checkpoint's runs.
        assert!(resumed_rc.run >= rc.run + RESTORE_MARGIN, "{} after {}", resumed_rc.run, rc.run);
        assert_eq!(wire::RoundConfig { run: 0, ..rc.clone() }, wire::RoundConfig { run: 0, ..resumed_rc });
        assert!(rc.dp_clip < clips[2] * 0.8, "{} after {clips:?}", rc.dp_clip);
        // A checkpoint's run numbers hold even where the clock went back;
        // one that is not a run number fails the restore.
        let ahead = rc.run + 1_000_000_000_000;
        let mut later = saved.clone();
        later.insert(NEXT_RUN_STATE, vec![ahead as f64]);
        let mut behind = server(&table, &job);
        behind.restore(&later).unwrap();
        assert_eq!(decode(&behind.begin_round(&info).unwrap()).run, ahead + RESTORE_MARGIN);
        later.insert(NEXT_RUN_STATE, vec![-1.0]);
        assert!(behind.restore(&later).unwrap_err().to_string().contains(NEXT_RUN_STATE));
        assert!(resumed.restore(&confide_algorithms::State::new()).is_err());
        // Split view of the clip: p0 is shown another (in-range) clip than
        // the others; its keys bind it, so the coordinator's check drops it.
        let info = RoundInfo { round: 10, parties: &names, global: &global, fit: Some(&fit) };
        let rm = coordinator.begin_round(&info).unwrap();
        let mut rc: wire::RoundConfig = prost::Message::decode(rm.as_slice()).unwrap();
        // (With the round message's digest forged to match: otherwise p0
        // itself refuses the round.)
        rc.dp_clip *= 2.0;
        let template = job.distributed_dp.unwrap();
        let shown = NoisyUpdate::with_clip(&template, Some(&adaptive), rc.dp_clip, &job.job_id, 10, &global).unwrap();
        rc.dp_digest = shown.digest().to_vec();
        let update =
            LocalUpdate { global: &global, fit: &fit, local: model(|_| small), num_examples: 1, train_loss: None };
        let advert = clients[0].contribute(10, &prost::Message::encode_to_vec(&rc), update).unwrap();
        let err =
            coordinator.on_message(Peer { name: "p0", certificate: &[], relay: None }, advert.clone()).unwrap_err();
        assert!(matches!(&err, Error::PeerMisbehaved { party, .. } if party == "p0"), "{err}");
        // A coordinator that skips its own check and relays p0's keys
        // anyway: the honest parties refuse the stage, naming p0, since
        // p0's signature binds the clip it was shown.
        let mut adverts = vec![advert];
        for c in clients.iter_mut().skip(1) {
            let update =
                LocalUpdate { global: &global, fit: &fit, local: model(|_| small), num_examples: 1, train_loss: None };
            adverts.push(c.contribute(10, &rm, update).unwrap());
        }
        let keys: Vec<wire::Keys> =
            adverts.iter().map(|a| prost::Message::decode(a.body.as_slice()).unwrap()).collect();
        let err = clients[1].on_step(10, SHARES, Envelope::encode(&wire::KeyList { keys })).unwrap_err();
        assert!(
            matches!(&err, Error::PeerMisbehaved { party, reason } if party == "coordinator" && reason.contains("p0")),
            "{err}"
        );
        // A coordinator that sends an absurd clip is refused and named.
        let mut coordinator = server(&table, &job);
        let info = RoundInfo { round: 9, parties: &names, global: &global, fit: Some(&fit) };
        let rm = coordinator.begin_round(&info).unwrap();
        let mut rc: wire::RoundConfig = prost::Message::decode(rm.as_slice()).unwrap();
        rc.dp_clip = 1e9;
        let update =
            LocalUpdate { global: &global, fit: &fit, local: model(|_| small), num_examples: 1, train_loss: None };
        let err = clients[0].contribute(9, &prost::Message::encode_to_vec(&rc), update).unwrap_err();
        assert!(
            matches!(&err, Error::PeerMisbehaved { party, reason } if party == "coordinator" && reason.contains("clip")),
            "{err}"
        );
    }

    /// A coordinator that starts a round with other DP parameters than the
    /// spec the party accepted (less noise, more honest parties assumed, no
    /// noise at all) is refused and named.
    #[test]
    fn a_party_refuses_a_round_with_other_noise_than_its_spec() {
        let job = noisy_facts(3, 3, 1.0);
        let global = model(|_| 0.0);
        let fit = fit();
        let names = names(3);
        for (what, coordinator_job) in [
            ("less noise", noisy_facts(3, 3, 0.1)),
            ("more honest parties", JobFacts { min_parties: 3, ..noisy_facts(4, 4, 1.0) }),
            ("no noise", facts(3)),
        ] {
            let coordinator_job = JobFacts { party_names: names.clone(), ..coordinator_job };
            let mut coordinator = server(&toml::Table::new(), &coordinator_job);
            let rm = coordinator
                .begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) })
                .unwrap();
            let mut p0 = SecAggPlus.client(&toml::Table::new(), &job, identity("p0")).unwrap();
            let update =
                LocalUpdate { global: &global, fit: &fit, local: model(|_| 0.1), num_examples: 1, train_loss: None };
            let err = p0.contribute(1, &rm, update).unwrap_err();
            assert!(matches!(&err, Error::PeerMisbehaved { party, .. } if party == "coordinator"), "{what}: {err}");
        }
    }

    /// Split view: the coordinator gives p0 a spec with less noise (a round
    /// message to match) and the others the real one. p0's signed keys bind
    /// its mechanism, so the round cannot complete: the coordinator's check
    /// drops p0, and relayed anyway, p0's keys make p1 refuse the stage.
    #[test]
    fn parties_given_different_dp_settings_cannot_complete_a_round() {
        let names = names(4);
        let (real, weak) = (noisy_facts(4, 3, 1.0), noisy_facts(4, 3, 0.05));
        let (global, fit) = (model(|_| 0.0), fit());
        let info = RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit) };
        let rm = server(&toml::Table::new(), &real).begin_round(&info).unwrap();
        let rm_weak = server(&toml::Table::new(), &weak).begin_round(&info).unwrap();
        let mut clients: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(i, p)| {
                SecAggPlus.client(&toml::Table::new(), if i == 0 { &weak } else { &real }, identity(p)).unwrap()
            })
            .collect();
        let mut adverts = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            let update =
                LocalUpdate { global: &global, fit: &fit, local: model(|_| 0.1), num_examples: 1, train_loss: None };
            adverts.push(c.contribute(1, if i == 0 { &rm_weak } else { &rm }, update).unwrap());
        }
        let mut coordinator = server(&toml::Table::new(), &real);
        coordinator.begin_round(&info).unwrap();
        let err =
            coordinator.on_message(Peer { name: "p0", certificate: &[], relay: None }, adverts[0].clone()).unwrap_err();
        assert!(matches!(&err, Error::PeerMisbehaved { party, .. } if party == "p0"), "{err}");
        let keys: Vec<wire::Keys> =
            adverts.iter().map(|a| prost::Message::decode(a.body.as_slice()).unwrap()).collect();
        let err = clients[1].on_step(1, SHARES, Envelope::encode(&wire::KeyList { keys })).unwrap_err();
        assert!(
            matches!(&err, Error::PeerMisbehaved { party, reason } if party == "coordinator" && reason.contains("p0")),
            "{err}"
        );
    }

    /// Each encrypted share carries its dealer's signature; the coordinator
    /// checks it before relaying, so a share without one drops its dealer.
    #[test]
    fn shares_without_their_dealers_signature_are_refused_naming_the_dealer() {
        let (mut clients, mut server, lists) = keyed(3);
        for (p, list) in lists {
            let i: usize = p[1..].parse().unwrap();
            let answer = clients[i].on_step(1, SHARES, list).unwrap();
            let mut shares: wire::Shares = prost::Message::decode(answer.body.as_slice()).unwrap();
            assert!(!shares.signature.is_empty(), "the shares are signed");
            if p == "p1" {
                shares.shares[0].self_mask[0] ^= 1;
                let err = server
                    .on_message(Peer { name: &p, certificate: &[], relay: None }, Envelope::encode(&shares))
                    .unwrap_err();
                assert!(
                    matches!(&err, Error::PeerMisbehaved { party, reason } if party == "p1" && reason.contains("signature")),
                    "{err}"
                );
            } else {
                server.on_message(Peer { name: &p, certificate: &[], relay: None }, answer).unwrap();
            }
        }
    }

    /// A share the coordinator alters on its way to the holder no longer
    /// matches what its dealer signed: the holder names the coordinator,
    /// not the dealer (without the dealer's signed digests, relayed with
    /// each share, it could not tell the two apart).
    #[test]
    fn a_share_altered_in_transit_names_the_coordinator_not_its_dealer() {
        let (mut clients, to_holders) = to_masked_input(4);
        for (p, m) in to_holders {
            let i: usize = p[1..].parse().unwrap();
            let mut shares: wire::Shares = m.decode("t", "t").unwrap();
            // Three dealers' shares, each with a path of two hashes (a tree
            // of three leaves, padded to four).
            assert!(
                shares
                    .shares
                    .iter()
                    .all(|s| !s.dealer_signature.is_empty() && s.dealer_leaves == 3 && s.dealer_path.len() == 2)
            );
            if p == "p1" {
                let dealer = shares.shares[0].from.clone();
                shares.shares[0].self_mask[3] ^= 1;
                let err = clients[i].on_step(1, MASKED_INPUT, Envelope::encode(&shares)).unwrap_err().to_string();
                assert!(
                    err.contains("party coordinator misbehaved")
                        && err.contains(&format!("relayed a share of {dealer} that {dealer} did not sign")),
                    "{err}"
                );
            } else {
                clients[i].on_step(1, MASKED_INPUT, m).unwrap();
            }
        }
        // With shares to spare, where p1 would otherwise stay and complain:
        // still the coordinator, and no complaint (which would hand it the
        // pair's keys) goes out.
        let (mut clients, to_holders) = to_masked_input(8);
        let (_, m) = to_holders.into_iter().find(|(p, _)| p == "p1").unwrap();
        let mut shares: wire::Shares = m.decode("t", "t").unwrap();
        shares.shares[0].mask_key[0] ^= 1;
        let err = clients[1].on_step(1, MASKED_INPUT, Envelope::encode(&shares)).unwrap_err().to_string();
        assert!(err.contains("party coordinator misbehaved") && err.contains("did not sign"), "{err}");
    }

    thread_local! {
        /// (dealer, holder): the dealer seals that holder a share that does
        /// not open, and signs it as dealt.
        static SPOILED_SHARE: std::cell::RefCell<Option<(String, String)>> = const { std::cell::RefCell::new(None) };
    }

    /// The test-only fault a dealer applies to its shares before signing
    /// them (none unless a test set [`SPOILED_SHARE`]).
    pub(super) fn dealer_fault(dealer: &str, mut shares: Vec<EncryptedShare>) -> Vec<EncryptedShare> {
        SPOILED_SHARE.with(|f| {
            if let Some((d, holder)) = f.borrow().as_ref()
                && d == dealer
                && let Some(s) = shares.iter_mut().find(|s| &s.to == holder)
            {
                s.self_mask.ciphertext[3] ^= 1;
            }
        });
        shares
    }

    /// A dealer that seals a holder a share that does not open, under its
    /// own signature (checked through the coordinator's relayed evidence,
    /// the tree path to the root it signed: the real relay's, not a
    /// hand-built one): the holder's masked input carries a proven
    /// complaint, and the round through both sides ends with the sum it
    /// would have had and the dealer among the misbehaved.
    #[test]
    fn a_share_its_dealer_sealed_wrongly_is_proven_through_the_relayed_evidence() {
        let table = toml::toml! { max_examples = 100 };
        let clean = run_with(&table, 8, &[]).unwrap();
        SPOILED_SHARE.with(|f| *f.borrow_mut() = Some(("p2".into(), "p1".into())));
        let outcome = std::panic::catch_unwind(|| {
            let (mut clients, to_holders) = to_masked_input(8);
            let (_, to_p1) = to_holders.into_iter().find(|(p, _)| p == "p1").unwrap();
            let answer = clients[1].on_step(1, MASKED_INPUT, to_p1).unwrap();
            let list: wire::MaskedComplaints = Envelope::body(answer.body).decode("p1", "complaints").unwrap();
            let dealers: Vec<&str> = list.complaints.iter().map(|c| c.dealer.as_str()).collect();
            assert_eq!(dealers, ["p2"]);
            let Aggregate::WeightedSum { weighted_delta_sum, contributors, misbehaved, .. } =
                run_aggregate(&table, 8, &[]).unwrap()
            else {
                panic!("secagg reveals only a sum")
            };
            assert_eq!((weighted_delta_sum, contributors), (clean.0, clean.3));
            assert!(
                misbehaved.iter().any(|(p, why)| p == "p2" && why.contains("proven by p1's complaint")),
                "{misbehaved:?}"
            );
        });
        SPOILED_SHARE.with(|f| *f.borrow_mut() = None);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e);
        }
    }

    /// The holder's verdict on a share that does not open, from the dealer's
    /// relayed evidence: a dealer is blamed or complained about only when
    /// its signature covers exactly that share; a share outside the signed tree, evidence
    /// missing, another leaf or a path that does not lead to the signed
    /// root, or a signature that does not check, is the coordinator's.
    #[test]
    fn a_share_that_does_not_open_is_blamed_on_whoever_the_evidence_shows() {
        use crate::secagg::protocol::{Client, IdentitySigner};
        use crate::secagg::testing::InsecureTagSigner;
        let names = names(3);
        let cfg = Config {
            job: "job".into(),
            round: 1,
            parties: names.clone(),
            threshold: 2,
            degree: 2,
            graph_seed: [0; 32],
            bits: 32,
            dim: 1,
            binding: [5; 32],
            min_survivors: 2,
        };
        let mut clients = Vec::new();
        let mut adverts = Vec::new();
        for p in &names {
            let (c, a) = Client::new(cfg.clone(), p, &InsecureTagSigner(p.clone()), &mut OsRng).unwrap();
            clients.push(c);
            adverts.push(a);
        }
        let dealt = clients[0].on_keys(&adverts[1..], &InsecureTagVerifier, &mut OsRng).unwrap();
        let signature = InsecureTagSigner("p0".into()).sign(&cfg.shares_transcript("p0", &dealt)).unwrap();
        let digests = Config::share_digests(&dealt);
        let to_p1: Vec<EncryptedShare> = dealt.iter().filter(|s| s.to == "p1").cloned().collect();
        let leaf = digests.iter().position(|d| *d == Config::share_digest(&to_p1[0])).unwrap();
        let verdict = |shares: &[EncryptedShare], evidence: &DealerEvidence| {
            check_dealers_signed(shares, evidence, &cfg, &InsecureTagVerifier).map_err(|e| e.to_string())
        };
        let evidence = |signature: Vec<u8>, leaf: usize, path: Vec<[u8; 32]>| -> DealerEvidence {
            [("p0".to_string(), Evidence { signature, leaves: digests.len(), leaf, path })].into()
        };
        let path = ShareTree::new(&digests).path(leaf);
        let signed = evidence(signature.clone(), leaf, path.clone());
        // Signed as it arrived: whatever is wrong with it is the dealer's.
        assert_eq!(verdict(&to_p1, &signed), Ok(()));
        let mut altered = to_p1.clone();
        altered[0].mask_key.ciphertext[0] ^= 1;
        let mut forged = signature.clone();
        forged[0] ^= 1;
        let mut bent = path.clone();
        bent[0][0] ^= 1;
        for (what, shares, ev) in [
            ("altered", &altered, signed),
            ("no evidence", &to_p1, DealerEvidence::new()),
            ("bad signature", &to_p1, evidence(forged, leaf, path.clone())),
            ("another leaf", &to_p1, evidence(signature.clone(), 1 - leaf, path.clone())),
            ("a bent path", &to_p1, evidence(signature.clone(), leaf, bent)),
            ("a short path", &to_p1, evidence(signature.clone(), leaf, path[..0].to_vec())),
        ] {
            let v = verdict(shares, &ev).unwrap_err();
            assert!(v.contains("party coordinator misbehaved") && v.contains("that p0 did not sign"), "{what}: {v}");
        }
    }

    #[test]
    fn steps_out_of_order_are_the_coordinators_fault() {
        let Begun { job, names, global, fit, round_message: rm, .. } = begun_round(3);
        let mut c = SecAggPlus.client(&toml::Table::new(), &job, identity("p0")).unwrap();
        c.contribute(
            1,
            &rm,
            LocalUpdate { global: &global, fit: &fit, local: params(&[0.1]), num_examples: 5, train_loss: None },
        )
        .unwrap();
        let survivors = Envelope::encode(&wire::Survivors { survivors: names.clone() });
        let unmask = Envelope::encode(&wire::UnmaskRequest { survivors: names.clone(), signatures: Vec::new() });
        for (stage, msg) in [(CONSISTENCY, survivors), (UNMASK, unmask.clone())] {
            let err = c.on_step(1, stage, msg).unwrap_err();
            assert!(
                matches!(&err, Error::PeerMisbehaved { party, reason } if party == "coordinator" && reason.contains("out of order")),
                "{stage}: {err}"
            );
        }
        let err = c.on_step(2, UNMASK, unmask).unwrap_err().to_string();
        assert!(err.contains("coordinator") && err.contains("out of order"), "{err}");
    }

    #[test]
    fn per_party_fit_configurations_are_refused_under_secure_aggregation() {
        let job = facts(3);
        let names = names(3);
        let global = params(&[0.0]);
        let info = RoundInfo { round: 1, parties: &names, global: &global, fit: None };
        let err = server(&toml::Table::new(), &job).begin_round(&info).unwrap_err().to_string();
        assert!(err.contains("different fit configurations"), "{err}");
    }

    #[test]
    fn a_plaintext_update_is_refused_by_name() {
        let Begun { global, mut server, .. } = begun_round(3);
        let plain = Envelope { body: Vec::new(), bulk: Some(Bulk::Params(std::sync::Arc::new(global.clone()))) };
        let err = server.on_message(Peer { name: "p1", certificate: &[], relay: None }, plain).unwrap_err().to_string();
        assert!(err.contains("party p1") && err.contains("plaintext update"), "{err}");
    }
}
