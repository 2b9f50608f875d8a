//! `he`: threshold-RLWE homomorphic aggregation ([`crate::he`]) as an
//! aggregation protocol. Parties encrypt their encoded updates under a
//! collective public key whose secret is Shamir-shared among them; the
//! coordinator only adds ciphertexts, and at least τ + 1 key parties decrypt
//! the sum — each only after checking, with a linear hash, that it is the sum
//! of the round's signed ciphertexts of at least `parties.min` parties.
//!
//! ```text
//!  fit            round config (parties, keygen?, key epoch, bits, dim, clip, max_examples)
//!                 keygen round: signed commitment to p_i and an X25519 key → he-key-deal
//!                 otherwise:    signed upload record + ciphertext           → he-hash
//!  he-key-deal    every signed commitment → p_i and one sealed, dealer-signed Shamir share per key party
//!  he-key-confirm the dealers' p_j and the shares addressed to the party
//!                 → the party checks p_j against the commitments, assembles the key,
//!                   and answers with its signed upload record + ciphertext
//!  he-hash        the contributors and the coordinator's commitment to Σ c1
//!                 → the party's signed linear hash of its own c1
//!  he-decrypt     Σ c1, every upload record and hash (and the c1 of contributors that
//!                 did not hash) → checked, the party's flooded decryption share
//! ```
//! A key epoch lasts until its flooding budget would be exceeded or a round
//! has parties outside it; the coordinator then starts a new one (a keygen
//! round). Everything a party can derive (threshold, parameters, the common
//! random polynomial, the round binding) it derives from the spec it
//! accepted; the binding is in every signature.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::dleq::{self, DhSecret, DleqProof};
use rand_core::OsRng;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::sum::{SumLayout, WideSum};
use super::update::{NoisePool, NoisyUpdate, WeightedUpdate};
use super::{
    AggregationClient, AggregationProtocol, AggregationServer, Bulk, Decoding, Envelope, JobFacts, LocalUpdate,
    Messages, PartyIdentity, Peer, PeerVerifier, Problem, Progress, Quorum, Reveals, RoundInfo, StageName, SumRound,
    parse_settings,
};
use crate::Error;
use crate::he::{
    self, Ciphertext, CommonPoly, Csprng, DealerSecret, DecryptionShare, HeParams, KeyShare, LinearHash, PublicKey,
    PublicKeyShare, SecretShare,
};
use crate::secagg::prim;

/// Parties reveal their public-key shares and deal their secret shares.
pub const KEY_DEAL: StageName = StageName::new("he-key-deal");
/// Parties assemble the collective key and upload their ciphertexts.
pub const KEY_CONFIRM: StageName = StageName::new("he-key-confirm");
/// Parties sign the linear hash of their ciphertext.
pub const HASH: StageName = StageName::new("he-hash");
/// Parties check the aggregate and send decryption shares.
pub const DECRYPT: StageName = StageName::new("he-decrypt");

/// Fewest parties whose ciphertexts a decryption may sum: with two, each
/// learns the other's update from the sum.
pub const MIN_ROUND_PARTIES: usize = 3;

/// Most bytes of a signature or certificate relayed.
const MAX_SIGNATURE: usize = 512;
const MAX_CERTIFICATE: usize = 16 << 10;

/// The threshold-HE protocol.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThresholdHe;

/// `[aggregation.he]` of a job spec.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeSettings {
    /// γ: the fraction of a key epoch's parties that may be corrupt and
    /// collude with the coordinator, in [0, 1/3). The threshold follows:
    /// τ = ⌊(n + ⌊γn⌋)/2⌋ + 1 shares decrypt.
    pub corrupt_fraction: f64,
    /// Bits of the plaintext modulus the encoded sum lives in. Unset: the
    /// most the job's largest key allows (each side derives it from the spec).
    pub bits: Option<u32>,
    /// Each coordinate of a party's (example-weighted) update is clipped to [-clip, clip].
    pub clip: f32,
    /// The most training examples one party may weigh in with.
    pub max_examples: u64,
    /// log2 of the coefficients a key may help decrypt before a new key
    /// epoch (the flooding noise's Rényi budget), 10..=40.
    pub key_budget_log2: u32,
    /// Decryptors asked beyond τ + 1 (tolerated silent decryptors; with one
    /// more than τ + 1 answering, a bad share is left out and its sender
    /// suspected, not convicted: see [`he::Decrypted::suspected`]).
    pub surplus: usize,
}

impl Default for HeSettings {
    fn default() -> Self {
        HeSettings {
            corrupt_fraction: 0.1,
            bits: None,
            clip: 1.0,
            max_examples: 10_000,
            key_budget_log2: 20,
            surplus: 2,
        }
    }
}

impl HeSettings {
    /// The settings in `table` with defaults filled in; errors name the field.
    pub fn from_table(table: &toml::Table) -> Result<Self, Vec<Problem>> {
        parse_settings(table)
    }

    /// The plaintext bits: as set, or the most every key size the job
    /// allows can decrypt exactly (at most 32).
    pub fn plaintext_bits(&self, job: &JobFacts) -> u32 {
        if let Some(b) = self.bits {
            return b;
        }
        round_sizes(job, self)
            .into_iter()
            .map(|n| {
                let t = he::params::threshold_for(n, self.corrupt_parties(job.party_bound()));
                HeParams::new(n, t, 1, self.key_budget_log2.clamp(10, 40), self.surplus.max(1))
                    .map_or(0, |p| p.max_bits())
            })
            .min()
            .unwrap_or(0)
            .min(he::params::MAX_BITS)
    }

    /// The bits once resolved ([`HeSettings::plaintext_bits`]).
    fn b(&self) -> u32 {
        self.bits.unwrap_or(he::params::MAX_BITS)
    }

    /// Corrupt parties tolerated in a job of at most `parties` parties:
    /// ⌊γ·parties⌋, whatever the size of the key the coordinator gathers
    /// (a small key must not lower the threshold below the coalition).
    pub fn corrupt_parties(&self, parties: usize) -> usize {
        crate::secagg::params::fraction_of(self.corrupt_fraction, parties)
    }

    /// The fewest contributors a sum a party decrypts may have: the job's
    /// minimum (at least 3), and at least two more than the job's corrupt
    /// parties, so that a sum the coordinator has decrypted always holds
    /// two honest updates, whichever corrupt parties contributed to it
    /// (they know their own, and would subtract them).
    pub fn min_contributors(&self, job: &JobFacts) -> usize {
        job.min_parties.max(MIN_ROUND_PARTIES).max(self.corrupt_parties(job.party_bound()) + 2)
    }

    /// The fewest parties a key may have in this job: the job's minimum
    /// (at least 3) and the smallest key whose threshold exceeds the
    /// job's corrupt parties with room for a checked decryption.
    pub fn key_floor(&self, job: &JobFacts) -> usize {
        let corrupt = self.corrupt_parties(job.party_bound());
        job.min_parties.max(MIN_ROUND_PARTIES).max(Self::min_key_parties(corrupt))
    }

    /// The smallest key whose threshold leaves room for a checked
    /// decryption with `corrupt` corrupt parties (and at least 3).
    pub fn min_key_parties(corrupt: usize) -> usize {
        // τ = ⌊(n + c)/2⌋ + 1 < n first holds at n = c + 3. In closed form:
        // a search from 3 ran for as long as a spec's huge corrupt_fraction
        // asked, before the fraction was checked (found by review).
        corrupt.saturating_add(3).max(MIN_ROUND_PARTIES)
    }

    /// The parameters of a key epoch of `n` parties in a job with at most
    /// `corrupt` corrupt parties: every party computes them from the spec
    /// and the epoch's size alone. τ = ⌊(n + corrupt)/2⌋ + 1 > corrupt.
    pub fn params(&self, n: usize, corrupt: usize) -> Result<HeParams, Error> {
        if n < MIN_ROUND_PARTIES {
            return Err(Error::BelowThreshold(format!(
                "he: a key of {n} parties; at least {MIN_ROUND_PARTIES} are needed"
            )));
        }
        let threshold = he::params::threshold_for(n, corrupt);
        if threshold + 1 > n {
            return Err(Error::InvalidInput(format!(
                "he: with {n} parties and corrupt_fraction {} the threshold is {threshold}; a checked \
                 decryption needs τ + 1 = {} decryptors",
                self.corrupt_fraction,
                threshold + 1
            )));
        }
        HeParams::new(n, threshold, self.b(), self.key_budget_log2, self.surplus.max(1))
    }

    fn check(&self, job: &JobFacts) -> Vec<Problem> {
        let mut p = Vec::new();
        if !(self.corrupt_fraction.is_finite() && (0.0..1.0 / 3.0).contains(&self.corrupt_fraction)) {
            p.push(Problem::setting(
                "corrupt_fraction",
                format!("must be in [0, 1/3) (got {})", self.corrupt_fraction),
            ));
        }
        if !(10..=40).contains(&self.key_budget_log2) {
            p.push(Problem::setting("key_budget_log2", format!("must be 10..=40 (got {})", self.key_budget_log2)));
        }
        if !(1..=8).contains(&self.surplus) {
            p.push(Problem::setting("surplus", format!("must be 1..=8 (got {})", self.surplus)));
        }
        // The settings every derived figure rests on, checked before any is
        // derived from them.
        if !p.is_empty() {
            return p;
        }
        let s = HeSettings { bits: Some(self.plaintext_bits(job)), ..*self };
        let s = &s;
        if !(8..=he::params::MAX_BITS).contains(&s.b()) {
            let why = if self.bits.is_some() {
                "must be"
            } else {
                "the largest key's noise leaves fewer than 8; reduce key_budget_log2 or surplus, or the parties"
            };
            p.push(Problem::setting("bits", format!("{why} 8..={} (got {})", he::params::MAX_BITS, s.b())));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            p.push(Problem::setting("clip", format!("must be positive and finite (got {})", self.clip)));
        }
        if job.min_parties < MIN_ROUND_PARTIES {
            p.push(Problem::spec(
                "parties.min",
                format!("he needs at least {MIN_ROUND_PARTIES} parties (with 2, each learns the other's update from the sum)"),
            ));
        }
        if !p.is_empty() {
            return p;
        }
        let parties = job.party_bound();
        if self.max_examples == 0 || (self.max_examples as u128) * (parties as u128) >= 1u128 << s.b() {
            p.push(Problem::setting(
                "max_examples",
                format!("must be positive and {parties} × max_examples must fit in {} bits", s.b()),
            ));
        }
        let corrupt = s.corrupt_parties(parties);
        if s.key_floor(job) > parties {
            p.push(Problem::setting(
                "corrupt_fraction",
                format!(
                    "with up to {corrupt} corrupt parties a key needs at least {} parties for a checked \
                     decryption; the job has at most {parties}",
                    s.key_floor(job)
                ),
            ));
        }
        for n in round_sizes(job, s) {
            if let Err(e) = s.params(n, corrupt) {
                let field = if e.to_string().contains("bits") { "bits" } else { "corrupt_fraction" };
                p.push(Problem::setting(field, format!("for {n} parties: {e}")));
            }
        }
        if WideSum::new(s.b(), parties).is_err() {
            p.push(Problem::setting(
                "bits",
                format!("{} bits leave no room to sum {parties} parties' statistics", s.b()),
            ));
        }
        p
    }
}

/// The largest key epoch a job can have and, when smaller, the smallest
/// one a party accepts ([`HeSettings::key_floor`]).
fn round_sizes(job: &JobFacts, s: &HeSettings) -> Vec<usize> {
    let largest = job.party_bound();
    let mut sizes = vec![largest];
    let floor = s.key_floor(job);
    if floor < largest {
        sizes.push(floor);
    }
    sizes.retain(|&n| n >= MIN_ROUND_PARTIES);
    sizes
}

fn settings_for(table: &toml::Table, job: &JobFacts) -> Result<HeSettings, Error> {
    let mut s = HeSettings::from_table(table).map_err(|p| problems(&p))?;
    let checked = s.check(job);
    if !checked.is_empty() {
        return Err(problems(&checked));
    }
    s.bits = Some(s.plaintext_bits(job));
    Ok(s)
}

fn problems(p: &[Problem]) -> Error {
    let text: Vec<String> = p.iter().map(|p| format!("{}: {}", p.field, p.message)).collect();
    Error::InvalidInput(format!("aggregation.he: {}", text.join("; ")))
}

impl AggregationProtocol for ThresholdHe {
    fn name(&self) -> &'static str {
        "he"
    }

    fn describe(&self) -> &'static str {
        "threshold homomorphic encryption under a collective key no party holds; the coordinator adds \
         ciphertexts and learns only the example-weighted sum"
    }

    fn stages(&self) -> &'static [StageName] {
        &[KEY_DEAL, KEY_CONFIRM, HASH, DECRYPT]
    }

    fn reveals(&self) -> Reveals {
        Reveals::WeightedSum
    }

    fn validate(&self, settings: &toml::Table, job: &JobFacts) -> Vec<Problem> {
        match HeSettings::from_table(settings) {
            Ok(s) => s.check(job),
            Err(p) => p,
        }
    }

    fn explain(&self, settings: &toml::Table, job: &JobFacts) -> Vec<String> {
        let Ok(mut s) = HeSettings::from_table(settings) else { return Vec::new() };
        s.bits = Some(s.plaintext_bits(job));
        let mut lines = vec![format!(
            "he threat model: up to {:.0}% of a key's parties corrupt (colluding with the coordinator) and following \
             the protocol; a corrupt party that deviates can, with the coordinator, read the joint key and every \
             update (docs/homomorphic-aggregation.md, Limits); decryption sums of at least {} parties only; key \
             budget 2^{} coefficients per key epoch",
            s.corrupt_fraction * 100.0,
            job.min_parties.max(MIN_ROUND_PARTIES),
            s.key_budget_log2
        )];
        for n in round_sizes(job, &s) {
            match s.params(n, s.corrupt_parties(job.party_bound())) {
                Ok(p) => lines.push(format!(
                    "he with {n} parties: τ = {} of {n} decrypt, {} asked; {} plaintext bits, c0 at {} bits, \
                     {:.2} bytes per value uploaded",
                    p.threshold,
                    p.threshold + p.surplus,
                    p.bits,
                    p.switch_bits,
                    p.ciphertext_bytes(he::ring::N) as f64 / he::ring::N as f64
                )),
                Err(e) => lines.push(format!("he with {n} parties: {e}")),
            }
        }
        lines
    }

    fn noise_carrier(&self, settings: &toml::Table, job: &JobFacts) -> Option<super::NoiseCarrier> {
        let s = settings_for(settings, job).ok()?;
        // Every decrypted sum holds at least parties.min ciphertexts; at most
        // ⌊γn⌋ of them are corrupt and can subtract their own noise.
        Some(super::NoiseCarrier {
            bits: s.b(),
            corrupt_parties: s.corrupt_parties(job.party_bound()),
            max_parties: job.max_parties,
        })
    }

    fn tolerated_corrupt_fraction(&self, settings: &toml::Table) -> Option<f64> {
        // 0 against colluders that deviate: nothing binds a ciphertext to
        // a well-formed encryption, so one corrupt party can upload a c1
        // with a large error the coordinator knows and read the joint secret
        // key off the decrypted sum (or cancel honest ciphertexts). The
        // settings' corrupt_fraction (its threshold, the DP calibration)
        // holds for colluders that follow the protocol only.
        HeSettings::from_table(settings).ok().map(|_| 0.0)
    }

    fn counts_colluders_per_round_without_names(&self) -> bool {
        // Counted from the job's party bound (the federation's limit when
        // no party is named), whatever the size of a key or a round.
        false
    }

    fn server(
        &self,
        settings: &toml::Table,
        job: &JobFacts,
        peers: Box<dyn PeerVerifier>,
    ) -> Result<Box<dyn AggregationServer>, Error> {
        let settings = settings_for(settings, job)?;
        let dp_clip = job.distributed_dp.map_or(0.0, |t| t.clip);
        Ok(Box::new(HeServer {
            settings,
            job: job.clone(),
            dp_clip,
            peers,
            epoch: None,
            round: None,
            suspect_key: false,
            convicted: BTreeMap::new(),
            roles: BTreeMap::new(),
        }))
    }

    fn client(
        &self,
        settings: &toml::Table,
        job: &JobFacts,
        party: PartyIdentity,
    ) -> Result<Box<dyn AggregationClient>, Error> {
        let settings = settings_for(settings, job)?;
        Ok(Box::new(HeClient {
            settings,
            job: job.clone(),
            party,
            epoch: None,
            round: None,
            ahead: None,
            last_values: None,
            noise: NoisePool::default(),
        }))
    }
}

/// This module's messages, as prost types (public for adversarial tests
/// that craft them).
#[allow(missing_docs)]
pub mod wire {
    /// The round's public parameters (with the fit task).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RoundConfig {
        #[prost(string, repeated, tag = "1")]
        pub parties: Vec<String>,
        /// A new key epoch starts with this round.
        #[prost(bool, tag = "2")]
        pub keygen: bool,
        /// The key epoch's id (the binding of its keygen round); empty in a keygen round.
        #[prost(bytes = "vec", tag = "3")]
        pub epoch: Vec<u8>,
        #[prost(uint32, tag = "4")]
        pub bits: u32,
        #[prost(uint64, tag = "5")]
        pub dim: u64,
        #[prost(float, tag = "6")]
        pub clip: f32,
        #[prost(uint64, tag = "7")]
        pub max_examples: u64,
        #[prost(uint64, tag = "8")]
        pub revocation_version: u64,
        #[prost(bytes = "vec", tag = "9")]
        pub dp_digest: Vec<u8>,
        #[prost(double, tag = "10")]
        pub dp_clip: f64,
    }

    /// A party's signed commitment to its public-key share, with the X25519
    /// key its Shamir shares are sealed to.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyCommit {
        #[prost(string, tag = "1")]
        pub party: String,
        #[prost(bytes = "vec", tag = "2")]
        pub commitment: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub dh_public: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub signature: Vec<u8>,
        /// The party's certificate (DER), as relayed by the coordinator.
        #[prost(bytes = "vec", tag = "5")]
        pub certificate: Vec<u8>,
        /// Proof that the party knows `dh_public`'s secret (64 bytes),
        /// checked by the coordinator and before any complaint about it.
        #[prost(bytes = "vec", tag = "6")]
        pub dh_proof: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CommitList {
        #[prost(message, repeated, tag = "1")]
        pub commits: Vec<KeyCommit>,
    }

    /// One Shamir share sealed (AES-256-GCM) to its recipient.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SealedShare {
        #[prost(string, tag = "1")]
        pub dealer: String,
        #[prost(string, tag = "2")]
        pub recipient: String,
        #[prost(bytes = "vec", tag = "3")]
        pub nonce: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub ciphertext: Vec<u8>,
        /// The dealer's signature over the sealed share: a recipient tells
        /// a share altered in transit (the coordinator's doing) from one
        /// the dealer sealed wrongly (the dealer's).
        #[prost(bytes = "vec", tag = "5")]
        pub signature: Vec<u8>,
    }

    /// A dealer's answer to he-key-deal (travels as bulk bytes).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Deal {
        #[prost(bytes = "vec", tag = "1")]
        pub public_share: Vec<u8>,
        #[prost(message, repeated, tag = "2")]
        pub shares: Vec<SealedShare>,
    }

    /// One dealer's public share and the share it sealed to the recipient.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dealt {
        #[prost(bytes = "vec", tag = "1")]
        pub public_share: Vec<u8>,
        #[prost(message, optional, tag = "2")]
        pub share: Option<SealedShare>,
        #[prost(string, tag = "3")]
        pub dealer: String,
    }

    /// What one party receives in he-key-confirm (travels as bulk bytes).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct KeyDelivery {
        #[prost(message, repeated, tag = "1")]
        pub dealt: Vec<Dealt>,
    }

    /// A party's signed record of its ciphertext (the ciphertext follows as bulk words).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Upload {
        #[prost(string, tag = "1")]
        pub party: String,
        #[prost(bytes = "vec", tag = "2")]
        pub fingerprint: Vec<u8>,
        #[prost(bytes = "vec", tag = "3")]
        pub c0_hash: Vec<u8>,
        #[prost(bytes = "vec", tag = "4")]
        pub c1_hash: Vec<u8>,
        #[prost(uint64, tag = "5")]
        pub bytes: u64,
        #[prost(bytes = "vec", tag = "6")]
        pub signature: Vec<u8>,
        #[prost(bytes = "vec", tag = "7")]
        pub certificate: Vec<u8>,
        /// The relay that summed this ciphertext into its group (not signed:
        /// the linear hash checks what the relay forwards).
        #[prost(string, tag = "8")]
        pub relay: String,
        /// On the record that carries a relay's group sum: the other members'
        /// signed records (the group's c0 and c1 sums follow as bulk words).
        #[prost(message, repeated, tag = "9")]
        pub group: Vec<Upload>,
        /// Bytes of the group sum that follow (0 on a member's own record).
        #[prost(uint64, tag = "10")]
        pub group_bytes: u64,
        /// In a key's first round: the dealers whose signed shares to this
        /// party did not open, each with the proven pairwise key (for the
        /// coordinator only: it strips them before relaying the record).
        #[prost(message, repeated, tag = "11")]
        pub complaints: Vec<KeyComplaint>,
        /// A hash of `complaints` (empty when there are none), signed with
        /// the record and kept when the complaints are stripped, so nobody
        /// on the way (a relay) can drop or add one unnoticed.
        #[prost(bytes = "vec", tag = "12")]
        pub complaints_hash: Vec<u8>,
        /// The fewest contributors a sum counting this ciphertext may have,
        /// by its party's own floor (the spec's minimum raised by its
        /// policy), signed: decryptors refuse a sum below any contributor's,
        /// so a contributor listed as vanished is held to its own floor too.
        #[prost(uint32, tag = "13")]
        pub min_contributors: u32,
    }

    /// "`dealer`'s key share to me, under its signature, does not open":
    /// the Diffie–Hellman value of the two committed keys, with its proof.
    pub use crate::dleq::WireComplaint as KeyComplaint;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HashRequest {
        #[prost(string, repeated, tag = "1")]
        pub contributors: Vec<String>,
        #[prost(bytes = "vec", tag = "2")]
        pub commitment: Vec<u8>,
        /// Contributors whose ciphertexts came in a relay's group sum: they
        /// also hash their c0 (nobody else pays for it).
        #[prost(string, repeated, tag = "3")]
        pub grouped: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HashValue {
        #[prost(string, tag = "1")]
        pub party: String,
        #[prost(uint64, repeated, tag = "2")]
        pub values: Vec<u64>,
        #[prost(bytes = "vec", tag = "3")]
        pub signature: Vec<u8>,
        /// The linear hash of its c0 (as integers mod q) under a key of its
        /// own: how the coordinator checks a relay's c0 sum.
        #[prost(uint64, repeated, tag = "4")]
        pub c0_values: Vec<u64>,
    }

    /// The decryption request; Σ c1 and then each vanished contributor's c1
    /// (62-bit packed, in `vanished` order) follow as bulk bytes.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DecryptRequest {
        #[prost(string, repeated, tag = "1")]
        pub contributors: Vec<String>,
        #[prost(bytes = "vec", tag = "2")]
        pub commitment: Vec<u8>,
        #[prost(message, repeated, tag = "3")]
        pub uploads: Vec<Upload>,
        #[prost(message, repeated, tag = "4")]
        pub hashes: Vec<HashValue>,
        #[prost(string, repeated, tag = "5")]
        pub decryptors: Vec<String>,
        #[prost(string, repeated, tag = "6")]
        pub vanished: Vec<String>,
        #[prost(uint64, tag = "7")]
        pub bytes: u64,
    }

    /// The length of the bytes that follow as bulk words.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Framed {
        #[prost(uint64, tag = "1")]
        pub bytes: u64,
    }
}

// ---------------------------------------------------------------- framing

fn to_words(bytes: &[u8]) -> Vec<u32> {
    // One copy into word storage (a memcpy on little-endian machines, which
    // the transfer layer then sends without another).
    let mut words = vec![0u32; bytes.len().div_ceil(4)];
    let out: &mut [u8] = bytemuck::cast_slice_mut(words.as_mut_slice());
    out[..bytes.len()].copy_from_slice(bytes);
    if cfg!(target_endian = "big") {
        words.iter_mut().for_each(|w| *w = u32::from_le(*w));
    }
    words
}

/// The `len` bytes carried in `words`: a view of them on little-endian
/// machines (no copy of a ciphertext on arrival), a copy elsewhere.
fn from_words<'a>(words: &'a [u32], len: u64, from: &str, what: &str) -> Result<Cow<'a, [u8]>, Error> {
    let len = usize::try_from(len).map_err(|_| misbehaved(from, format!("{what}: absurd length")))?;
    if words.len() != len.div_ceil(4) {
        return Err(misbehaved(from, format!("{what}: {} words for {len} bytes", words.len())));
    }
    let out: Cow<'a, [u8]> = if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice::<u32, u8>(words))
    } else {
        Cow::Owned(words.iter().flat_map(|w| w.to_le_bytes()).collect())
    };
    if out[len..].iter().any(|&b| b != 0) {
        return Err(misbehaved(from, format!("{what}: non-zero padding")));
    }
    Ok(match out {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..len]),
        Cow::Owned(mut v) => {
            v.truncate(len);
            Cow::Owned(v)
        }
    })
}

/// A message too large for a body (key material, ciphertexts) as bulk words.
fn framed(header: &impl prost::Message, payload: &[u8]) -> Envelope {
    Envelope { body: header.encode_to_vec(), bulk: Some(Bulk::Words(to_words(payload))) }
}

fn framed_message(msg: &impl prost::Message) -> Envelope {
    let bytes = msg.encode_to_vec();
    framed(&wire::Framed { bytes: bytes.len() as u64 }, &bytes)
}

fn unframe_message<T: prost::Message + Default>(e: Envelope, from: &str, what: &str) -> Result<T, Error> {
    let header: wire::Framed = e.decode(from, what)?;
    let Some(Bulk::Words(words)) = e.bulk else { return Err(misbehaved(from, format!("{what} without its bytes"))) };
    let bytes = from_words(&words, header.bytes, from, what)?;
    T::decode(&*bytes).map_err(|err| misbehaved(from, format!("malformed {what}: {err}")))
}

fn describe_left_out(groups: &[(String, Vec<String>)]) -> String {
    groups.iter().map(|(relay, members)| format!("{relay}: {}", members.join(", "))).collect::<Vec<_>>().join("; ")
}

fn misbehaved(party: &str, reason: impl Into<String>) -> Error {
    Error::PeerMisbehaved { party: party.to_owned(), reason: reason.into() }
}

fn coordinator_fault(reason: impl Into<String>) -> Error {
    misbehaved("coordinator", reason)
}

// ------------------------------------------------------- transcripts

fn hash_u64s(label: &str, v: &[u64]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(label);
    #[cfg(target_endian = "little")]
    h.update(bytemuck::cast_slice::<u64, u8>(v));
    #[cfg(not(target_endian = "little"))]
    for x in v {
        h.update(&x.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

fn c0_hash(c0: &[u64]) -> [u8; 32] {
    hash_u64s("confide he c0 v1", c0)
}

fn c1_hash(c1: &[u64]) -> [u8; 32] {
    hash_u64s("confide he c1 v1", c1)
}

fn aggregate_commitment(c1: &[u64]) -> [u8; 32] {
    hash_u64s("confide he aggregate c1 v1", c1)
}

/// H(binding, party, p_i): bound to the round and the dealer, so nobody
/// can pass another party's commitment off as its own.
fn public_share_commitment(binding: &[u8; 32], party: &str, bytes: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("confide he public-key share v1");
    h.update(binding);
    h.update(&(party.len() as u64).to_le_bytes());
    h.update(party.as_bytes());
    h.update(bytes);
    *h.finalize().as_bytes()
}

fn transcript(label: &str, binding: &[u8; 32], party: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in [label.as_bytes(), binding.as_slice(), party.as_bytes()].into_iter().chain(parts.iter().copied()) {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn names_bytes(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in names {
        out.extend_from_slice(&(n.len() as u64).to_le_bytes());
        out.extend_from_slice(n.as_bytes());
    }
    out
}

fn commit_transcript(binding: &[u8; 32], party: &str, commitment: &[u8], dh_public: &[u8], dh_proof: &[u8]) -> Vec<u8> {
    transcript("he-commit", binding, party, &[commitment, dh_public, dh_proof])
}

/// What a party's proof that it knows its Diffie–Hellman key's secret is
/// bound to. Without the proof a dealer could commit a multiple of an
/// honest party's key; a complaint about it would then reveal (a multiple
/// of) the complainer's shared value with that honest party, opening the
/// key shares the two sealed to each other (found by review).
fn possession_context(binding: &[u8; 32], party: &str) -> Vec<u8> {
    transcript("he-dh-possession", binding, party, &[])
}

fn upload_transcript(binding: &[u8; 32], u: &wire::Upload) -> Vec<u8> {
    transcript(
        "he-upload",
        binding,
        &u.party,
        &[
            &u.fingerprint,
            &u.c0_hash,
            &u.c1_hash,
            &u.bytes.to_le_bytes(),
            &u.complaints_hash,
            &u.min_contributors.to_le_bytes(),
        ],
    )
}

/// The signed hash of `party`'s complaints: empty when there are none.
fn complaints_hash(binding: &[u8; 32], party: &str, complaints: &[wire::KeyComplaint]) -> Vec<u8> {
    if complaints.is_empty() {
        return Vec::new();
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(3 * complaints.len());
    for c in complaints {
        parts.extend([c.dealer.as_bytes(), c.shared.as_slice(), c.proof.as_slice()]);
    }
    blake3::hash(&transcript("he-complaints", binding, party, &parts)).as_bytes().to_vec()
}

fn hash_transcript(
    binding: &[u8; 32],
    party: &str,
    commitment: &[u8],
    contributors: &[String],
    values: &[u64],
    c0_values: &[u64],
) -> Vec<u8> {
    let v: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let v0: Vec<u8> = c0_values.iter().flat_map(|x| x.to_le_bytes()).collect();
    transcript("he-hash", binding, party, &[commitment, &names_bytes(contributors), &v, &v0])
}

/// The linear hash's key: fixed only by the coordinator's commitment to Σ c1
/// (and the round and contributors), so it cannot be chosen before the sum.
fn linear_hash(binding: &[u8; 32], commitment: &[u8], contributors: &[String]) -> LinearHash {
    LinearHash::new(&transcript("he-linear-hash", binding, "", &[commitment, &names_bytes(contributors)]))
}

/// The linear hash of c0 (another key, fixed at the same point): relays
/// forward only c0 sums, which nothing else checks.
fn c0_linear_hash(binding: &[u8; 32], commitment: &[u8], contributors: &[String]) -> LinearHash {
    LinearHash::new(&transcript("he-linear-hash-c0", binding, "", &[commitment, &names_bytes(contributors)]))
}

/// What a dealer signs each sealed share over: the round, the commitment
/// list it dealt under ([`commit_list_digest`]) and the share. A recipient
/// checks it against the list it was shown itself, so a coordinator that
/// shows two parties different lists (one with a party's earlier
/// commitment, say, from the same key round started twice) is named at
/// key-confirm, before any share is opened or complained about: a complaint
/// reveals the pair's Diffie–Hellman value, which opens the complainer's own
/// share to that dealer as well, harmless only when the dealer really
/// sealed wrongly (and so is corrupt and holds that share anyway).
fn sealed_share_transcript(binding: &[u8; 32], list: &[u8; 32], s: &wire::SealedShare) -> Vec<u8> {
    transcript("he-sealed-share", binding, &s.dealer, &[list, s.recipient.as_bytes(), &s.nonce, &s.ciphertext])
}

/// The digest of a key round's commitment list: each party's name,
/// commitment and Diffie–Hellman key, in name order.
fn commit_list_digest<'a>(
    binding: &[u8; 32],
    commits: impl Iterator<Item = (&'a str, &'a [u8], &'a [u8])>,
) -> [u8; 32] {
    let mut parts: Vec<&[u8]> = Vec::new();
    for (party, commitment, dh_public) in commits {
        parts.extend([party.as_bytes(), commitment, dh_public]);
    }
    *blake3::hash(&transcript("he-commit-list", binding, "", &parts)).as_bytes()
}

fn share_aad(binding: &[u8; 32], dealer: &str, recipient: &str) -> Vec<u8> {
    transcript("he-share", binding, dealer, &[recipient.as_bytes()])
}

/// The key sealing `dealer`'s share to `recipient`, from their
/// Diffie–Hellman value (which a complaint reveals to the coordinator).
fn share_key_from(shared: &[u8; 32], binding: &[u8; 32], dealer: &str, recipient: &str) -> Zeroizing<[u8; 32]> {
    prim::derive(shared.as_slice(), &share_aad(binding, dealer, recipient))
}

fn share_key(
    own: &DhSecret,
    peer: &[u8; 32],
    peer_name: &str,
    binding: &[u8; 32],
    dealer: &str,
    recipient: &str,
) -> Result<Zeroizing<[u8; 32]>, Error> {
    let shared = own.agree(peer, peer_name)?;
    Ok(share_key_from(&shared, binding, dealer, recipient))
}

/// What a complaint's proof is bound to: the key's round, the dealer and
/// the complainer, so it proves nothing about another pair or round.
fn complaint_context(binding: &[u8; 32], dealer: &str, recipient: &str) -> Vec<u8> {
    transcript("he-complaint", binding, dealer, &[recipient.as_bytes()])
}

fn crp(epoch: &[u8; 32]) -> CommonPoly {
    CommonPoly::derive(&transcript("he-crp", epoch, "", &[]))
}

fn array32(b: &[u8], from: &str, what: &str) -> Result<[u8; 32], Error> {
    b.try_into().map_err(|_| misbehaved(from, format!("{what} of {} bytes, expected 32", b.len())))
}

// ------------------------------------------------------------ round

/// A round's public parameters as both sides derive them.
#[derive(Debug, Clone)]
struct Derived {
    round: u32,
    parties: Vec<String>,
    keygen: bool,
    /// The key epoch (its keygen round's binding; this round's own when keygen).
    epoch: [u8; 32],
    dim: usize,
    /// Everything above, what the round sums (model and fit configuration,
    /// or a sum layout), the spec's settings and the DP mechanism, hashed:
    /// in every signature of the round.
    binding: [u8; 32],
}

#[allow(clippy::too_many_arguments)]
fn derive_round(
    job: &str,
    round: u32,
    parties: &[String],
    keygen: bool,
    epoch: Option<[u8; 32]>,
    dim: usize,
    s: &HeSettings,
    subject: [u8; 32],
    revocation_version: u64,
    dp: Option<[u8; 32]>,
) -> Derived {
    // v2: c1 in the NTT domain and the rank-one linear hash. Parties of
    // different versions then fail at each other's signatures over the
    // round, not at a decryptor's hash check (which blames the coordinator).
    let mut h = blake3::Hasher::new_derive_key("confide he round v2");
    let names: Vec<&str> = parties.iter().map(String::as_str).collect();
    h.update(&prim::context("round", job, round, &names));
    h.update(&[u8::from(keygen)]);
    h.update(&epoch.unwrap_or_default());
    for v in [
        u64::from(s.b()),
        dim as u64,
        u64::from(s.clip.to_bits()),
        s.max_examples,
        s.corrupt_fraction.to_bits(),
        u64::from(s.key_budget_log2),
        s.surplus as u64,
        revocation_version,
    ] {
        h.update(&v.to_le_bytes());
    }
    h.update(&subject);
    if let Some(dp) = dp {
        h.update(b"distributed dp");
        h.update(&dp);
    }
    let binding = *h.finalize().as_bytes();
    Derived { round, parties: parties.to_vec(), keygen, epoch: epoch.unwrap_or(binding), dim, binding }
}

// ------------------------------------------------------------ server

struct ServerEpoch {
    id: [u8; 32],
    params: HeParams,
    key_parties: Vec<String>,
    fingerprint: [u8; 32],
    /// Coefficients decrypted under this key (each decryptor's budget use).
    decrypted: u64,
    /// Key parties whose share a convicted dealer spoiled: never decryptors.
    /// A key with any is retired after its first round.
    spoiled: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerStage {
    Commits,
    Deals,
    Uploads,
    Hashes,
    Decrypt,
}

struct ServerRound {
    derived: Derived,
    decoding: Decoding,
    stage: ServerStage,
    certs: BTreeMap<String, Vec<u8>>,
    commits: BTreeMap<String, wire::KeyCommit>,
    deals: BTreeMap<String, wire::Deal>,
    /// The epoch a keygen round is building.
    pending: Option<ServerEpoch>,
    /// Each contributor's signed record and its c1 (none for a relay
    /// group's member: only the group's sum came).
    uploads: BTreeMap<String, (wire::Upload, Option<Vec<u64>>)>,
    /// Relay groups: their members and sums, checked as a whole.
    groups: Vec<RelayGroup>,
    /// Relay groups left out of the sum: relay and members.
    left_out: Vec<(String, Vec<String>)>,
    /// Members of relay groups whose records came without the group's sum
    /// (it comes on another member's message), by the relay carrying them:
    /// those counted in no sum when the stage closes are left out, named.
    relayed: BTreeMap<String, String>,
    /// Members of left-out groups that answered the hash request again:
    /// alive key parties, so decryptors, though not contributors.
    alive_outside: BTreeSet<String>,
    aggregate: Option<he::Aggregate>,
    contributors: Vec<String>,
    commitment: [u8; 32],
    hashes: BTreeMap<String, wire::HashValue>,
    decryptors: Vec<String>,
    shares: BTreeMap<String, DecryptionShare>,
    /// Parties caught misbehaving on the way (reported with the sum).
    flagged: Vec<(String, String)>,
}

/// The sum a relay forwarded for its members.
struct RelayGroup {
    relay: String,
    members: Vec<String>,
    c0: Vec<u64>,
    c1: Vec<u64>,
}

impl ServerRound {
    /// A sum of the current uploads must have as many contributors as each
    /// contributor signed for (its own floor): an honest coordinator stops
    /// here, since every decryptor would refuse. Skipped by the tests that
    /// play a coordinator deviating so.
    fn check_signed_floors(&self) -> Result<(), Error> {
        #[cfg(test)]
        if tests::IGNORE_SIGNED_FLOORS.with(std::cell::Cell::get) {
            return Ok(());
        }
        let count = self.uploads.len();
        for (party, (upload, _)) in &self.uploads {
            if count < upload.min_contributors as usize {
                return Err(Error::BelowThreshold(format!(
                    "he: {count} ciphertexts; {party} signed for sums of at least {} (its own policy's minimum)",
                    upload.min_contributors
                )));
            }
        }
        Ok(())
    }

    /// Commits to the aggregate and asks for the contributors' linear
    /// hashes (relay-group members also hash their c0, the only check of a
    /// group's c0 sum). Members of left-out relay groups are asked too: they
    /// hold key shares and may be needed as decryptors.
    fn hash_step(&mut self, contributors: Vec<String>) -> Result<Progress, Error> {
        let aggregate = self.aggregate.as_ref().ok_or_else(|| Error::BelowThreshold("he: no ciphertexts".into()))?;
        self.commitment = aggregate_commitment(&aggregate.c1);
        self.contributors = contributors.clone();
        self.hashes.clear();
        self.alive_outside.clear();
        self.stage = ServerStage::Hashes;
        let mut grouped: Vec<String> = self.groups.iter().flat_map(|g| g.members.iter().cloned()).collect();
        grouped.sort();
        let message = Envelope::encode(&wire::HashRequest {
            contributors: contributors.clone(),
            commitment: self.commitment.to_vec(),
            grouped,
        });
        let mut to = contributors;
        to.extend(self.left_out.iter().flat_map(|(_, m)| m.iter().cloned()));
        to.sort();
        to.dedup();
        Ok(Progress::Step { stage: HASH, messages: Messages::Same { to, message }, quorum: Quorum::Protocol })
    }

    /// `party`'s upload is counted: it is no longer left out, whatever a
    /// refused group named earlier (review finding: a party that sent a
    /// group of its relay's naming honest parties got their uploads left
    /// out too).
    fn counted(&mut self, party: &str) {
        for (_, members) in &mut self.left_out {
            members.retain(|m| m != party);
        }
    }

    fn grouped(&self, party: &str) -> bool {
        self.groups.iter().any(|g| g.members.iter().any(|m| m == party))
    }
}

struct HeServer {
    settings: HeSettings,
    job: JobFacts,
    dp_clip: f64,
    peers: Box<dyn PeerVerifier>,
    epoch: Option<ServerEpoch>,
    round: Option<ServerRound>,
    /// The last stage failed in a way that may be the key's fault.
    suspect_key: bool,
    /// Dealers proven to have sealed a bad key share (by a checked
    /// complaint), with the proof's description: left out of every later
    /// round and key of this job.
    convicted: BTreeMap<String, String>,
    /// The finished round's roles (decryptors, relay groups).
    roles: BTreeMap<String, Vec<String>>,
}

impl HeServer {
    fn need(&self) -> usize {
        self.job.min_parties.max(MIN_ROUND_PARTIES)
    }

    fn begin(
        &mut self,
        round: u32,
        parties: &[String],
        dim: usize,
        subject: [u8; 32],
        decoding: Decoding,
    ) -> Result<Vec<u8>, Error> {
        let slots = dim.div_ceil(he::ring::N) as u64 * he::ring::N as u64;
        // A dealer convicted of a bad key share is in no later round (the
        // round config leaves it out, so its messages are refused).
        let kept: Vec<String> = parties.iter().filter(|p| !self.convicted.contains_key(*p)).cloned().collect();
        let parties = kept.as_slice();
        // A new key when there is none, when a party is outside it, or when
        // decrypting this round would exceed its flooding budget.
        let keygen = match &self.epoch {
            None => true,
            // Also when a convicted dealer spoiled a share of this key, even
            // if the round it was convicted in failed before retiring it.
            Some(e) => {
                parties.iter().any(|p| e.key_parties.binary_search(p).is_err())
                    || e.decrypted + slots > e.params.key_budget
                    || !e.spoiled.is_empty()
                    || e.key_parties.iter().any(|p| self.convicted.contains_key(p))
            }
        };
        let epoch = if keygen { None } else { self.epoch.as_ref().map(|e| e.id) };
        let revocations = self.peers.revocation_version();
        let dp = match &decoding {
            Decoding::Noisy(n) => Some(n.digest()),
            _ => None,
        };
        let derived = derive_round(
            &self.job.job_id,
            round,
            parties,
            keygen,
            epoch,
            dim,
            &self.settings,
            subject,
            revocations,
            dp,
        );
        let s = &self.settings;
        let msg = wire::RoundConfig {
            parties: parties.to_vec(),
            keygen,
            epoch: epoch.map(|e| e.to_vec()).unwrap_or_default(),
            bits: s.b(),
            dim: dim as u64,
            clip: s.clip,
            max_examples: s.max_examples,
            revocation_version: revocations,
            dp_digest: dp.map(|d| d.to_vec()).unwrap_or_default(),
            dp_clip: match &decoding {
                Decoding::Noisy(n) => n.clip(),
                _ => 0.0,
            },
        };
        let stage = if keygen { ServerStage::Commits } else { ServerStage::Uploads };
        self.round = Some(ServerRound {
            derived,
            decoding,
            stage,
            certs: BTreeMap::new(),
            commits: BTreeMap::new(),
            deals: BTreeMap::new(),
            pending: None,
            uploads: BTreeMap::new(),
            groups: Vec::new(),
            left_out: Vec::new(),
            relayed: BTreeMap::new(),
            alive_outside: BTreeSet::new(),
            aggregate: None,
            contributors: Vec::new(),
            commitment: [0; 32],
            hashes: BTreeMap::new(),
            decryptors: Vec::new(),
            shares: BTreeMap::new(),
            flagged: Vec::new(),
        });
        Ok(prost::Message::encode_to_vec(&msg))
    }

    fn current_epoch<'a>(epoch: &'a Option<ServerEpoch>, r: &'a ServerRound) -> Result<&'a ServerEpoch, Error> {
        r.pending.as_ref().or(epoch.as_ref()).ok_or_else(|| Error::WrongStage("he: no key epoch".into()))
    }

    fn on_upload(&mut self, from: Peer<'_>, message: Envelope) -> Result<(), Error> {
        let (party, certificate) = (from.name, from.certificate);
        let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round in progress".into()))?;
        let (params, fingerprint, in_key) = {
            let e = Self::current_epoch(&self.epoch, r)?;
            (e.params.clone(), e.fingerprint, e.key_parties.iter().any(|p| p == party))
        };
        let mut upload: wire::Upload = message.decode(party, "upload record")?;
        if upload.party != party {
            return Err(misbehaved(party, format!("sent an upload record for {}", upload.party)));
        }
        // Complaints are checked before anything changes, and never relayed;
        // the signed record says whether there are any, and which.
        let complaints = std::mem::take(&mut upload.complaints);
        if upload.complaints_hash != complaints_hash(&r.derived.binding, party, &complaints) {
            let via = from.relay.map_or(String::new(), |relay| format!(" (or relay {relay} altered them)"));
            return Err(misbehaved(party, format!("sent key complaints that its signed upload record does not{via}")));
        }
        if !complaints.is_empty() {
            if !upload.relay.is_empty() {
                return Err(misbehaved(party, "key complaints on a relay group's record"));
            }
            Self::check_complaints(r, party, &complaints)?;
        }
        if !upload.relay.is_empty() {
            if upload.group.is_empty() && upload.group_bytes == 0 && message.bulk.is_none() {
                // A relay group's member: its signed record comes with the
                // group's sum, on the leader's message.
                if let Some(relay) = from.relay {
                    r.relayed.insert(party.to_owned(), relay.to_owned());
                }
                return Ok(());
            }
            let relay = upload.relay.clone();
            // A party's own stream carries no relay's group: what comes on
            // it is that party's doing (review finding: a forged group
            // naming honest parties got them left out, nobody dropped).
            if from.relay.is_none() {
                return Err(misbehaved(party, format!("sent a group of relay {relay} on its own stream")));
            }
            let mut members: Vec<String> = upload.group.iter().map(|m| m.party.clone()).collect();
            members.push(party.to_owned());
            // Only the relay that carries the leader's stream (as admitted on
            // the leader's delegation) can have summed its group.
            let claimed = if from.relay == Some(relay.as_str()) {
                Ok(())
            } else {
                Err(misbehaved(
                    party,
                    format!(
                        "a group of relay {relay} came {}",
                        from.relay.map_or("directly".to_owned(), |r| format!("through relay {r}"))
                    ),
                ))
            };
            return match claimed.and_then(|()| self.on_group(party, certificate, upload, message.bulk)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    // The relay's fault or one member's, not the leader's
                    // alone: the group is left out, the reason in the
                    // round's roles; nobody is dropped for it. A member
                    // named there that uploads on its own is counted (see
                    // `ServerRound::counted`): the names are the sender's word.
                    let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round".into()))?;
                    members.retain(|m| r.derived.parties.contains(m) && !r.uploads.contains_key(m));
                    members.sort();
                    members.dedup();
                    r.left_out.push((format!("{relay} (refused: {e})"), members));
                    Ok(())
                }
            };
        }
        let expected = params.ciphertext_bytes(r.derived.dim.max(1)) as u64;
        let floor = self.settings.min_contributors(&self.job);
        Self::check_record(&mut *self.peers, r, &upload, party, certificate, in_key, &fingerprint, (expected, floor))?;
        let Some(Bulk::Words(words)) = message.bulk else {
            return Err(misbehaved(party, "an upload without its ciphertext"));
        };
        let bytes = from_words(&words, upload.bytes, party, "ciphertext")?;
        let ct = Ciphertext::from_bytes(&params, r.derived.dim.max(1), &bytes, party)?;
        if c0_hash(&ct.c0).as_slice() != upload.c0_hash || c1_hash(&ct.c1).as_slice() != upload.c1_hash {
            return Err(misbehaved(party, "its ciphertext does not match its signed upload record"));
        }
        let aggregate = r.aggregate.get_or_insert_with(|| he::Aggregate::new(ct.c1.len()));
        aggregate.add(&ct.c0, &ct.c1, 1, &params)?;
        upload.certificate = certificate.to_vec();
        r.uploads.insert(party.to_owned(), (upload, Some(ct.c1)));
        r.counted(party);
        // Proven: each dealer complained about is out of this job's later
        // keys and rounds; the complainer's share lacks its part, so it
        // does not decrypt, and the key is retired after this round.
        for c in complaints {
            let reason = format!(
                "sealed {party} a key share, under its own signature, that does not open to a key share (proven \
                 by {party}'s complaint in round {})",
                r.derived.round
            );
            r.flagged.push((c.dealer.clone(), reason.clone()));
            self.convicted.insert(c.dealer, reason);
            if let Some(p) = r.pending.as_mut() {
                p.spoiled.insert(party.to_owned());
            }
        }
        Ok(())
    }

    /// Checks `party`'s complaints about its key shares: each names a dealer
    /// of the key being dealt and reveals the pairwise Diffie–Hellman value
    /// with a proof that it is the one of the two committed keys; the
    /// coordinator then opens the dealer's signed share itself. `Ok` only
    /// if every complaint is proven (the share does not open); a false
    /// complaint names the complainer.
    fn check_complaints(r: &ServerRound, party: &str, complaints: &[wire::KeyComplaint]) -> Result<(), Error> {
        if r.pending.is_none() || complaints.len() > r.deals.len() {
            return Err(misbehaved(party, "complained about key shares outside a key's first round"));
        }
        let binding = &r.derived.binding;
        let key_of = |p: &str| -> Result<[u8; 32], Error> {
            let c = r.commits.get(p).ok_or_else(|| misbehaved(party, format!("complained about {p}, no dealer")))?;
            array32(&c.dh_public, p, "key")
        };
        let mut seen = BTreeSet::new();
        for c in complaints {
            let dealer = c.dealer.as_str();
            if dealer == party || !seen.insert(dealer) {
                return Err(misbehaved(party, format!("complained about {dealer} twice or about itself")));
            }
            let share = r
                .deals
                .get(dealer)
                .and_then(|d| d.shares.iter().find(|s| s.recipient == party))
                .ok_or_else(|| misbehaved(party, format!("complained about {dealer}, who dealt it no share")))?;
            let shared = array32(&c.shared, party, "revealed key")?;
            let proof = DleqProof::from_bytes(&c.proof, party)?;
            let context = complaint_context(binding, dealer, party);
            dleq::verify(&key_of(party)?, &key_of(dealer)?, &shared, &proof, &context, party)?;
            let key = share_key_from(&shared, binding, dealer, party);
            let nonce: [u8; 12] = share.nonce.as_slice().try_into().map_err(|_| misbehaved(dealer, "a bad nonce"))?;
            // A share that opens to a well-formed key share is good, and the
            // complaint false; one that does not open, or opens to bytes
            // that are not a key share, convicts the dealer.
            let opened = prim::open(&key, &nonce, &share.ciphertext, &share_aad(binding, dealer, party));
            if opened.is_some_and(|plain| SecretShare::from_bytes(&plain, 0, 0, dealer).is_ok()) {
                return Err(misbehaved(party, format!("complained about {dealer}'s key share, which opens")));
            }
        }
        Ok(())
    }

    /// The checks every signed upload record passes, direct or in a group.
    #[allow(clippy::too_many_arguments)]
    fn check_record(
        peers: &mut dyn PeerVerifier,
        r: &ServerRound,
        upload: &wire::Upload,
        party: &str,
        certificate: &[u8],
        in_key: bool,
        fingerprint: &[u8; 32],
        (expected_bytes, floor): (u64, usize),
    ) -> Result<(), Error> {
        if upload.signature.len() > MAX_SIGNATURE || certificate.len() > MAX_CERTIFICATE {
            return Err(misbehaved(party, "sent an oversized signature or certificate"));
        }
        if r.uploads.contains_key(party) {
            return Err(misbehaved(party, "uploaded twice"));
        }
        if !in_key {
            return Err(misbehaved(party, "uploaded without being a party of the key epoch"));
        }
        if upload.fingerprint != fingerprint {
            return Err(misbehaved(party, "encrypted under another key than the epoch's"));
        }
        // A floor above the job's own would make every sum fail for all
        // (a party's word deciding the round): refused as that party's
        // doing, so it alone leaves the stage; honest parties sign the
        // job's floor (found by review).
        #[cfg(test)]
        let floor = if tests::IGNORE_SIGNED_FLOORS.with(std::cell::Cell::get) { usize::MAX } else { floor };
        if upload.min_contributors as usize > floor {
            return Err(misbehaved(
                party,
                format!(
                    "signed for sums of at least {} contributors, more than the job's {floor} (its limits or \
                     settings differ from the coordinator's)",
                    upload.min_contributors
                ),
            ));
        }
        if upload.bytes != expected_bytes {
            return Err(misbehaved(
                party,
                format!("a ciphertext of {} bytes, expected {expected_bytes}", upload.bytes),
            ));
        }
        peers.add_peer(party, certificate)?;
        peers.verify(party, &upload_transcript(&r.derived.binding, upload), &upload.signature).map_err(|_| {
            misbehaved(party, "its upload record does not carry its signature (or is for another job or round)")
        })
    }

    /// A relay's group sum, on the record of its last member: every member's
    /// signed record is checked as a direct upload's; the sum itself is
    /// checked against their signed linear hashes when the hash stage closes.
    fn on_group(
        &mut self,
        leader: &str,
        certificate: &[u8],
        mut upload: wire::Upload,
        bulk: Option<Bulk>,
    ) -> Result<(), Error> {
        let floor = self.settings.min_contributors(&self.job);
        let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round in progress".into()))?;
        let e = Self::current_epoch(&self.epoch, r)?;
        let (params, fingerprint) = (e.params.clone(), e.fingerprint);
        let key_parties = e.key_parties.clone();
        let relay = upload.relay.clone();
        let group = std::mem::take(&mut upload.group);
        if group.len() + 1 > r.derived.parties.len() {
            return Err(misbehaved(leader, format!("relay {relay} forwarded a group larger than the round")));
        }
        let expected = params.ciphertext_bytes(r.derived.dim.max(1)) as u64;
        let mut members: Vec<(wire::Upload, Vec<u8>)> = Vec::with_capacity(group.len() + 1);
        for mut m in group {
            m.group.clear();
            m.group_bytes = 0;
            if !r.derived.parties.contains(&m.party) || m.party == leader {
                return Err(misbehaved(
                    leader,
                    format!("relay {relay} grouped {}, not another party of the round", m.party),
                ));
            }
            if members.iter().any(|(x, _)| x.party == m.party) {
                return Err(misbehaved(leader, format!("relay {relay} grouped {} twice", m.party)));
            }
            if !m.complaints.is_empty() || !m.complaints_hash.is_empty() {
                // A relay forwards an upload with complaints alone.
                return Err(misbehaved(
                    leader,
                    format!("relay {relay} grouped {}'s upload with key complaints", m.party),
                ));
            }
            let cert = std::mem::take(&mut m.certificate);
            members.push((m, cert));
        }
        members.push((upload, certificate.to_vec()));
        for (m, cert) in &members {
            let in_key = key_parties.binary_search(&m.party).is_ok();
            Self::check_record(&mut *self.peers, r, m, &m.party, cert, in_key, &fingerprint, (expected, floor))
                .map_err(|e| match e {
                    Error::PeerMisbehaved { party, reason } if party != leader => {
                        misbehaved(leader, format!("relay {relay} forwarded a record of {party} that fails: {reason}"))
                    }
                    other => other,
                })?;
        }
        let Some(Bulk::Words(words)) = bulk else {
            return Err(misbehaved(leader, format!("relay {relay} forwarded a group without its sum")));
        };
        let slots = r.derived.dim.max(1).div_ceil(he::ring::N) * he::ring::N;
        let count = members.len();
        if relay::group_c0_bits(params.switch_bits, count) > 64 {
            return Err(misbehaved(leader, format!("relay {relay} forwarded a group too large for one c0 sum")));
        }
        let want = relay::group_bytes(slots, params.switch_bits, count) as u64;
        if members.last().map(|(m, _)| m.group_bytes) != Some(want) {
            return Err(misbehaved(leader, format!("relay {relay} forwarded a group sum that is not {want} bytes")));
        }
        let bytes = from_words(&words, want, leader, "group sum")?;
        let c0_len = he::pack::packed_len(slots, relay::group_c0_bits(params.switch_bits, count));
        let bad = |e: Error| misbehaved(leader, format!("relay {relay}: {e}"));
        let c0 = he::pack::unpack(&bytes[..c0_len], slots, relay::group_c0_bits(params.switch_bits, count), "group c0")
            .map_err(bad)?;
        let c1 = he::pack::unpack(&bytes[c0_len..], slots, 62, "group c1").map_err(bad)?;
        if c1.iter().any(|&c| c >= he::ring::Q) {
            return Err(misbehaved(leader, format!("relay {relay}: a group c1 coefficient not below q")));
        }
        let aggregate = r.aggregate.get_or_insert_with(|| he::Aggregate::new(slots));
        aggregate.add(&c0, &c1, count, &params)?;
        let mut names: Vec<String> = members.iter().map(|(m, _)| m.party.clone()).collect();
        names.sort();
        for (mut m, cert) in members {
            m.certificate = cert;
            m.relay.clear();
            m.group_bytes = 0;
            r.uploads.insert(m.party.clone(), (m, None));
        }
        for name in &names {
            r.counted(name);
        }
        r.groups.push(RelayGroup { relay, members: names, c0, c1 });
        Ok(())
    }
}

impl AggregationServer for HeServer {
    fn begin_round(&mut self, round: &RoundInfo<'_>) -> Result<Vec<u8>, Error> {
        let Some(fit) = round.fit else {
            return Err(Error::InvalidInput(
                "the strategy gave the parties different fit configurations; under he every party must get the \
                 same one (a configuration of its own would let the coordinator read one party's update off the sum)"
                    .into(),
            ));
        };
        let s = &self.settings;
        let (dim, decoding) = match &self.job.distributed_dp {
            Some(template) => {
                let noisy = NoisyUpdate::with_clip(
                    template,
                    self.job.adaptive_clip.as_ref(),
                    self.dp_clip,
                    &self.job.job_id,
                    round.round,
                    round.global,
                )?;
                (noisy.words(), Decoding::Noisy(Box::new(noisy)))
            }
            None => (
                WeightedUpdate::words(round.global.num_values()),
                Decoding::Updates(WeightedUpdate::new(s.b(), s.clip, s.max_examples, self.job.party_bound())?),
            ),
        };
        self.begin(round.round, round.parties, dim, super::training_digest(round.global, fit), decoding)
    }

    fn begin_sum(&mut self, round: &SumRound<'_>) -> Result<Vec<u8>, Error> {
        let encoding = WideSum::new(self.settings.b(), self.job.party_bound())?;
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
        let stage =
            self.round.as_ref().map(|r| r.stage).ok_or_else(|| Error::WrongStage("no he round in progress".into()))?;
        if !self.round.as_ref().is_some_and(|r| r.derived.parties.iter().any(|p| p == party)) {
            return Err(misbehaved(party, "is not a party of this round"));
        }
        if matches!(message.bulk, Some(Bulk::Params(_))) {
            return Err(misbehaved(party, "sent a plaintext update in an he job"));
        }
        // The limit every party applies to what the coordinator relays.
        if from.certificate.len() > MAX_CERTIFICATE {
            return Err(misbehaved(party, "presented an oversized certificate"));
        }
        match stage {
            ServerStage::Commits => {
                let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round".into()))?;
                let commit: wire::KeyCommit = message.decode(party, "key commitment")?;
                if commit.party != party {
                    return Err(misbehaved(party, format!("committed as {}", commit.party)));
                }
                let well_formed = commit.commitment.len() == 32 && commit.signature.len() <= MAX_SIGNATURE;
                let Some(dh_public) = array32(&commit.dh_public, party, "key").ok().filter(|_| well_formed) else {
                    return Err(misbehaved(party, "a malformed key commitment"));
                };
                // Also refuses a key that is not a usable group element.
                let proof = dleq::PossessionProof::from_bytes(&commit.dh_proof, party)?;
                let context = possession_context(&r.derived.binding, party);
                dleq::verify_possession(&dh_public, &proof, &context, party)?;
                self.peers.add_peer(party, from.certificate)?;
                self.peers
                    .verify(
                        party,
                        &commit_transcript(
                            &r.derived.binding,
                            party,
                            &commit.commitment,
                            &commit.dh_public,
                            &commit.dh_proof,
                        ),
                        &commit.signature,
                    )
                    .map_err(|_| misbehaved(party, "its key commitment does not carry its signature"))?;
                r.certs.insert(party.to_owned(), from.certificate.to_vec());
                r.commits.insert(party.to_owned(), commit);
                Ok(())
            }
            ServerStage::Deals => {
                let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round".into()))?;
                let deal: wire::Deal = unframe_message(message, party, "dealing")?;
                let epoch = r.pending.as_ref().ok_or_else(|| Error::WrongStage("no key being dealt".into()))?;
                let commit = r.commits.get(party).ok_or_else(|| misbehaved(party, "dealt without a commitment"))?;
                if public_share_commitment(&r.derived.binding, party, &deal.public_share).as_slice()
                    != commit.commitment
                {
                    return Err(misbehaved(party, "revealed a public-key share that does not match its commitment"));
                }
                PublicKeyShare::from_bytes(&deal.public_share, party)?;
                let recipients: Vec<&str> = deal.shares.iter().map(|s| s.recipient.as_str()).collect();
                let others: Vec<&str> = epoch.key_parties.iter().map(String::as_str).filter(|p| *p != party).collect();
                if recipients != others || deal.shares.iter().any(|s| s.dealer != party || s.nonce.len() != 12) {
                    return Err(misbehaved(party, "did not deal one sealed share to each other key party, in order"));
                }
                // Checked before relaying, so that one dealer's bad signature
                // drops that dealer, not every recipient; over the list this
                // coordinator sent every key party.
                let list = commit_list_digest(
                    &r.derived.binding,
                    r.commits.values().map(|c| (c.party.as_str(), c.commitment.as_slice(), c.dh_public.as_slice())),
                );
                for share in &deal.shares {
                    if share.signature.len() > MAX_SIGNATURE
                        || self
                            .peers
                            .verify(party, &sealed_share_transcript(&r.derived.binding, &list, share), &share.signature)
                            .is_err()
                    {
                        return Err(misbehaved(
                            party,
                            format!("its key share for {} does not carry its signature", share.recipient),
                        ));
                    }
                }
                r.deals.insert(party.to_owned(), deal);
                Ok(())
            }
            ServerStage::Uploads => self.on_upload(from, message),
            ServerStage::Hashes => {
                let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round".into()))?;
                let hv: wire::HashValue = message.decode(party, "hash value")?;
                if hv.party != party
                    || hv.values.len() != he::hash::RHO
                    || hv.c0_values.len() != if r.grouped(party) { he::hash::RHO } else { 0 }
                    || hv.values.iter().chain(&hv.c0_values).any(|&v| v >= he::ring::Q)
                    || hv.signature.len() > MAX_SIGNATURE
                {
                    return Err(misbehaved(party, "a malformed hash value"));
                }
                let outside = !r.uploads.contains_key(party)
                    && r.left_out.iter().any(|(_, members)| members.iter().any(|m| m == party));
                if !r.uploads.contains_key(party) && !outside {
                    return Err(misbehaved(party, "hashed a ciphertext it did not upload"));
                }
                self.peers
                    .verify(
                        party,
                        &hash_transcript(
                            &r.derived.binding,
                            party,
                            &r.commitment,
                            &r.contributors,
                            &hv.values,
                            &hv.c0_values,
                        ),
                        &hv.signature,
                    )
                    .map_err(|_| misbehaved(party, "its hash value does not carry its signature"))?;
                if outside {
                    // Alive (a decryptor), its ciphertext not in the sum.
                    r.alive_outside.insert(party.to_owned());
                    return Ok(());
                }
                // The values are checked when the stage closes: all at once
                // against the hash of the sum, one by one only if that fails.
                r.hashes.insert(party.to_owned(), hv);
                Ok(())
            }
            ServerStage::Decrypt => {
                let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round".into()))?;
                if !r.decryptors.iter().any(|d| d == party) {
                    return Err(misbehaved(party, "sent a decryption share without being asked"));
                }
                let params = Self::current_epoch(&self.epoch, r)?.params.clone();
                let header: wire::Framed = message.decode(party, "decryption share")?;
                let Some(Bulk::Words(words)) = message.bulk else {
                    return Err(misbehaved(party, "a decryption share without its bytes"));
                };
                let bytes = from_words(&words, header.bytes, party, "decryption share")?;
                let slots = r.aggregate.as_ref().map_or(0, |a| a.c1.len());
                let share = DecryptionShare::from_bytes(&params, slots, &bytes, party)?;
                r.shares.insert(party.to_owned(), share);
                Ok(())
            }
        }
    }

    fn close_stage(&mut self) -> Result<Progress, Error> {
        let progress = self.advance();
        // A failed round that was dealing a key, or a decryption that failed
        // naming nobody, leaves no key behind: the next round deals afresh.
        if progress.is_err() {
            self.round = None;
            if self.suspect_key {
                self.epoch = None;
            }
        }
        progress
    }

    fn round_roles(&mut self) -> BTreeMap<String, Vec<String>> {
        std::mem::take(&mut self.roles)
    }

    fn state(&self) -> confide_algorithms::State {
        super::adaptive_clip_state(&self.job, self.dp_clip)
    }

    fn restore(&mut self, state: &confide_algorithms::State) -> Result<(), Error> {
        if let Some(clip) = super::restore_adaptive_clip(&self.job, state)? {
            self.dp_clip = clip;
        }
        Ok(())
    }
}

impl HeServer {
    fn advance(&mut self) -> Result<Progress, Error> {
        let need = self.need();
        let fewest_summed = self.settings.min_contributors(&self.job);
        let key_floor = self.settings.key_floor(&self.job);
        self.suspect_key = false;
        let r = self.round.as_mut().ok_or_else(|| Error::WrongStage("no he round in progress".into()))?;
        match r.stage {
            ServerStage::Commits => {
                let key_parties: Vec<String> = r.commits.keys().cloned().collect();
                if key_parties.len() < key_floor {
                    return Err(Error::BelowThreshold(format!(
                        "he: {} parties committed to key shares; a key needs at least {key_floor}",
                        key_parties.len()
                    )));
                }
                let params =
                    self.settings.params(key_parties.len(), self.settings.corrupt_parties(self.job.party_bound()))?;
                r.pending = Some(ServerEpoch {
                    id: r.derived.epoch,
                    params,
                    key_parties: key_parties.clone(),
                    fingerprint: [0; 32],
                    decrypted: 0,
                    spoiled: BTreeSet::new(),
                });
                let commits = r
                    .commits
                    .values()
                    .map(|c| wire::KeyCommit {
                        certificate: r.certs.get(&c.party).cloned().unwrap_or_default(),
                        ..c.clone()
                    })
                    .collect();
                r.stage = ServerStage::Deals;
                Ok(Progress::Step {
                    stage: KEY_DEAL,
                    messages: Messages::Same {
                        to: key_parties,
                        message: Envelope::encode(&wire::CommitList { commits }),
                    },
                    quorum: Quorum::JobMinimum,
                })
            }
            ServerStage::Deals => {
                let dealers: Vec<String> = r.deals.keys().cloned().collect();
                let pending = r.pending.as_mut().ok_or_else(|| Error::WrongStage("no key being dealt".into()))?;
                if dealers.len() < need.max(pending.params.threshold) {
                    return Err(Error::BelowThreshold(format!(
                        "he: {} parties dealt key shares; the key needs at least {}",
                        dealers.len(),
                        need.max(pending.params.threshold)
                    )));
                }
                let mut shares = Vec::with_capacity(dealers.len());
                for d in &dealers {
                    shares.push(PublicKeyShare::from_bytes(&r.deals[d].public_share, d)?);
                }
                pending.fingerprint = PublicKey::assemble(&crp(&pending.id), &shares)?.fingerprint();
                // Each dealer receives every dealer's public share and the
                // share sealed to it.
                let per_party = dealers
                    .iter()
                    .map(|to| {
                        let dealt = dealers
                            .iter()
                            .map(|d| wire::Dealt {
                                dealer: d.clone(),
                                public_share: r.deals[d].public_share.clone(),
                                share: r.deals[d].shares.iter().find(|s| &s.recipient == to).cloned(),
                            })
                            .collect();
                        (to.clone(), framed_message(&wire::KeyDelivery { dealt }))
                    })
                    .collect();
                r.stage = ServerStage::Uploads;
                Ok(Progress::Step {
                    stage: KEY_CONFIRM,
                    messages: Messages::PerParty(per_party),
                    quorum: Quorum::JobMinimum,
                })
            }
            ServerStage::Uploads => {
                // Members whose relay's sum never came (a relay that omits
                // it, or lost its leader's stream): not contributors, and
                // listed, so that they still serve as decryptors.
                let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for (member, relay) in &r.relayed {
                    let listed = r.left_out.iter().any(|(_, m)| m.contains(member));
                    if !r.uploads.contains_key(member) && !listed {
                        missing.entry(relay.clone()).or_default().push(member.clone());
                    }
                }
                for (relay, members) in missing {
                    r.left_out.push((format!("{relay} (no group sum came)"), members));
                }
                let contributors: Vec<String> = r.uploads.keys().cloned().collect();
                if contributors.len() < fewest_summed {
                    self.suspect_key = r.pending.is_some();
                    return Err(Error::BelowThreshold(format!(
                        "he: {} ciphertexts; a decryption needs the sum of at least {fewest_summed}",
                        contributors.len()
                    )));
                }
                r.check_signed_floors()?;
                // The key is in use only once enough parties encrypted under it.
                if let Some(p) = r.pending.take() {
                    self.epoch = Some(p);
                }
                r.hash_step(contributors)
            }
            ServerStage::Hashes => {
                let epoch = self.epoch.as_ref().ok_or_else(|| Error::WrongStage("he: no key epoch".into()))?;
                let params = &epoch.params;
                let hash = linear_hash(&r.derived.binding, &r.commitment, &r.contributors);
                // A relay group counts only as a whole, and only when its sum
                // is its members' signed hashes; otherwise it leaves the
                // round and the rest hash again over the smaller sum.
                let mut broken = Vec::new();
                let hash0 = c0_linear_hash(&r.derived.binding, &r.commitment, &r.contributors);
                let rho = |v: &[u64]| <[u64; he::hash::RHO]>::try_from(v).ok();
                for (i, g) in r.groups.iter().enumerate() {
                    let (mut values, mut values0) = (Vec::new(), Vec::new());
                    for m in &g.members {
                        match r.hashes.get(m).and_then(|h| Some((rho(&h.values)?, rho(&h.c0_values)?))) {
                            Some((v, v0)) => {
                                values.push(v);
                                values0.push(v0);
                            }
                            None => break,
                        }
                    }
                    // Both halves: c1 (what decryptors check) and c0 (which
                    // carries the plaintext and nothing else would check).
                    if values.len() < g.members.len()
                        || he::hash::sum_hashes(&values) != hash.hash(&[&g.c1])
                        || he::hash::sum_hashes(&values0) != hash0.hash(&[&g.c0])
                    {
                        broken.push(i);
                    }
                }
                if !broken.is_empty() {
                    let aggregate =
                        r.aggregate.as_mut().ok_or_else(|| Error::BelowThreshold("he: no ciphertexts".into()))?;
                    for &i in broken.iter().rev() {
                        let g = r.groups.remove(i);
                        for (a, b) in aggregate.c0.iter_mut().zip(&g.c0) {
                            *a = a.wrapping_sub(*b);
                        }
                        he::ring::sub_assign(&mut aggregate.c1, &g.c1);
                        aggregate.count -= g.members.len();
                        for m in &g.members {
                            r.uploads.remove(m);
                        }
                        r.left_out.push((g.relay, g.members));
                    }
                    let contributors: Vec<String> = r.uploads.keys().cloned().collect();
                    if contributors.len() < fewest_summed {
                        return Err(Error::BelowThreshold(format!(
                            "he: {} ciphertexts after leaving out relay groups whose sum their members' hashes do \
                             not confirm ({}); a decryption needs the sum of at least {fewest_summed}",
                            contributors.len(),
                            describe_left_out(&r.left_out)
                        )));
                    }
                    r.check_signed_floors()?;
                    return r.hash_step(contributors);
                }
                // A wrong hash value would make the decryptors refuse: find
                // any (one hash of the sum when all are right) and treat its
                // sender as vanished, so its c1 goes to the decryptors.
                let aggregate =
                    r.aggregate.as_ref().ok_or_else(|| Error::BelowThreshold("he: no ciphertexts".into()))?;
                let mut known: Vec<[u64; he::hash::RHO]> = Vec::with_capacity(r.contributors.len());
                let mut rest: Vec<&String> = Vec::new();
                for p in &r.contributors {
                    match r.hashes.get(p).and_then(|h| <[u64; he::hash::RHO]>::try_from(h.values.as_slice()).ok()) {
                        Some(v) => known.push(v),
                        None => rest.push(p),
                    }
                }
                if !rest.is_empty() {
                    let mut rest_c1 = vec![0u64; aggregate.c1.len()];
                    for p in &rest {
                        let c1 = r.uploads[*p].1.as_ref().ok_or_else(|| {
                            Error::WrongStage(format!("he: {p}'s ciphertext came in a group and is not held"))
                        })?;
                        he::ring::add_assign(&mut rest_c1, c1);
                    }
                    known.push(hash.hash(&[&rest_c1]));
                }
                if he::hash::sum_hashes(&known) != hash.hash(&[&aggregate.c1]) {
                    let liars: Vec<String> = r
                        .hashes
                        .iter()
                        .filter(|(p, h)| {
                            r.uploads[*p]
                                .1
                                .as_ref()
                                .is_some_and(|c1| h.values.as_slice() != hash.hash(&[c1]).as_slice())
                        })
                        .map(|(p, _)| p.clone())
                        .collect();
                    for p in liars {
                        r.hashes.remove(&p);
                        r.flagged.push((p, "signed a linear hash that is not its ciphertext's".into()));
                    }
                }
                // Decryptors: key parties alive now (they hashed), smallest
                // Shamir points first (the smallest decoding noise).
                let alive: Vec<String> = epoch
                    .key_parties
                    .iter()
                    .filter(|p| r.hashes.contains_key(*p) || r.alive_outside.contains(*p))
                    // A convicted dealer may still decrypt in the round it is
                    // convicted in (its share is cross-checked): leaving it
                    // out too could leave fewer than τ + 1.
                    .filter(|p| !epoch.spoiled.contains(*p))
                    .cloned()
                    .collect();
                if alive.len() < params.threshold + 1 {
                    return Err(Error::BelowThreshold(format!(
                        "he: {} key parties answered; a checked decryption needs τ + 1 = {}",
                        alive.len(),
                        params.threshold + 1
                    )));
                }
                r.decryptors = alive.into_iter().take(params.threshold + params.surplus).collect();
                let vanished: Vec<String> =
                    r.contributors.iter().filter(|p| !r.hashes.contains_key(*p)).cloned().collect();
                let aggregate =
                    r.aggregate.as_ref().ok_or_else(|| Error::BelowThreshold("he: no ciphertexts".into()))?;
                let mut payload = Vec::new();
                he::pack::pack(&aggregate.c1, 62, &mut payload);
                for v in &vanished {
                    let c1 = r.uploads[v].1.as_ref().ok_or_else(|| {
                        Error::WrongStage(format!("he: {v}'s ciphertext came in a group and is not held"))
                    })?;
                    he::pack::pack(c1, 62, &mut payload);
                }
                let request = wire::DecryptRequest {
                    contributors: r.contributors.clone(),
                    commitment: r.commitment.to_vec(),
                    // Never a complaint's revealed key, whatever came in.
                    uploads: r
                        .uploads
                        .values()
                        .map(|(u, _)| wire::Upload { complaints: Vec::new(), ..u.clone() })
                        .collect(),
                    hashes: r.hashes.values().cloned().collect(),
                    decryptors: r.decryptors.clone(),
                    vanished,
                    bytes: payload.len() as u64,
                };
                r.stage = ServerStage::Decrypt;
                Ok(Progress::Step {
                    stage: DECRYPT,
                    messages: Messages::Same { to: r.decryptors.clone(), message: framed(&request, &payload) },
                    quorum: Quorum::Protocol,
                })
            }
            ServerStage::Decrypt => {
                let epoch = self.epoch.as_mut().ok_or_else(|| Error::WrongStage("he: no key epoch".into()))?;
                let aggregate =
                    r.aggregate.as_ref().ok_or_else(|| Error::BelowThreshold("he: no ciphertexts".into()))?;
                let indices: Vec<usize> =
                    r.decryptors.iter().filter_map(|d| epoch.key_parties.binary_search(d).ok()).collect();
                let shares: Vec<Option<DecryptionShare>> = r.decryptors.iter().map(|d| r.shares.remove(d)).collect();
                // Who decrypted, and which relays summed whose ciphertexts.
                let of = match &r.decoding {
                    Decoding::Statistics(_) => " (statistics)",
                    _ => "",
                };
                self.roles.clear();
                let answered: Vec<String> =
                    r.decryptors.iter().zip(&shares).filter(|(_, s)| s.is_some()).map(|(d, _)| d.clone()).collect();
                // The relay names are as the relays state them (unsigned);
                // two groups under one name are listed together.
                for g in &r.groups {
                    self.roles.entry(format!("relay {}{of}", g.relay)).or_default().extend(g.members.iter().cloned());
                }
                for (relay, members) in &r.left_out {
                    self.roles
                        .entry(format!("left out: relay {relay}{of}"))
                        .or_default()
                        .extend(members.iter().cloned());
                }
                // Every decryptor that answered used its budget on the whole aggregate.
                epoch.decrypted += aggregate.c1.len() as u64;
                let result = he::combine(&epoch.params, aggregate, &indices, &shares, r.derived.dim);
                if result.as_ref().is_err_and(|e| matches!(e, Error::PeerMisbehaved { .. })) {
                    // Shares that cannot be reconciled: perhaps a dealer's bad
                    // key share. Deal a new key next round.
                    self.suspect_key = true;
                }
                let result = result.map_err(|e| match e {
                    Error::PeerMisbehaved { party, reason } => Error::InvalidInput(format!(
                        "he: decryption failed, no sum ({party}: {reason}; a bad decryption share, a contributor's \
                         crafted ciphertext and a dealer's wrong key share look alike without proofs)"
                    )),
                    other => other,
                })?;
                // Decryptors: the answers combined (without the first
                // suspected share, when the whole set did not check).
                let suspected: Vec<String> =
                    result.suspected.iter().filter_map(|&i| epoch.key_parties.get(i)).cloned().collect();
                self.roles.insert(
                    format!("decryptors{of}"),
                    answered.iter().filter(|d| suspected.first() != Some(*d)).cloned().collect(),
                );
                if !suspected.is_empty() {
                    // Suspected, not excluded: a contributor's ciphertext
                    // (or a dealer's key share) can be crafted to make an
                    // honest decryptor's share look bad (found by review),
                    // so this is no proof. The sum is right; the key is
                    // replaced next round in case a key share is at fault.
                    self.roles.insert(format!("suspected decryptors{of}"), suspected);
                    self.suspect_key = true;
                }
                let misbehaved: Vec<(String, String)> = std::mem::take(&mut r.flagged);
                let (aggregate, next_clip) =
                    r.decoding.aggregate(&self.job, &result.values, r.contributors.clone(), misbehaved)?;
                if let Some(clip) = next_clip {
                    self.dp_clip = clip;
                }
                // A key a convicted dealer took part in serves this round
                // only: the next deals one without it. So does a key whose
                // decryption did not check as a whole.
                if !epoch.spoiled.is_empty() || self.suspect_key {
                    self.epoch = None;
                }
                self.round = None;
                Ok(Progress::Done(aggregate))
            }
        }
    }
}

// ------------------------------------------------------------ client

/// Randomness that does not depend on the data, drawn ahead of rounds
/// under one key for one model size, so that the round does not wait for
/// it. Each item is consumed by one round: a mask by one encryption, a
/// flood by one decryption share.
struct Ahead {
    epoch: [u8; 32],
    slots: usize,
    masks: VecDeque<he::EncryptionMasks>,
    floods: VecDeque<he::FloodingNoise>,
}

impl Ahead {
    /// Two mask residues and one flood residue per slot and round.
    const BYTES_PER_SLOT: usize = 24;
}

struct ClientEpoch {
    id: [u8; 32],
    params: HeParams,
    key_parties: Vec<String>,
    public_key: PublicKey,
    fingerprint: [u8; 32],
    /// `None` after a complaint: a share without a dealer's part would
    /// only spoil decryptions, so this party takes none under this key.
    share: Option<KeyShare>,
}

enum ClientStage {
    /// Keygen: committed; waiting for the commitment list.
    Committed { secret: DealerSecret, dh: DhSecret, public_share: Vec<u8> },
    /// Keygen: dealt; waiting for the key material addressed to it.
    Dealt {
        dh: DhSecret,
        own_share: SecretShare,
        params: HeParams,
        key_parties: Vec<String>,
        commits: BTreeMap<String, ([u8; 32], [u8; 32])>,
        /// Each committed key's proof of possession, checked before any
        /// complaint about its dealer.
        dh_proofs: BTreeMap<String, dleq::PossessionProof>,
        /// The commitment list's digest: every share this party takes
        /// must be signed over it.
        list: [u8; 32],
    },
    /// Uploaded; waiting for the hash request.
    Uploaded { c0: Vec<u64>, c1: Vec<u64> },
    /// Hashed; waiting for the decryption request.
    /// Kept c1: the coordinator may ask again over a smaller sum (a relay
    /// group left out) before it asks for a decryption.
    Hashed { commitment: [u8; 32], contributors: Vec<String>, own: Vec<u64>, c0: Vec<u64>, c1: Vec<u64> },
}

struct ClientRound {
    derived: Derived,
    /// What it sums: `fit` or a [`SumLayout`]'s purpose.
    kind: &'static str,
    input: Zeroizing<Vec<u32>>,
    stage: ClientStage,
}

struct HeClient {
    settings: HeSettings,
    job: JobFacts,
    party: PartyIdentity,
    epoch: Option<ClientEpoch>,
    round: Option<ClientRound>,
    /// Randomness drawn ahead of rounds for the current key and a model size.
    ahead: Option<Ahead>,
    /// Values of the last update encrypted: the next round's likely size.
    last_values: Option<usize>,
    /// Distributed-DP noise drawn ahead of rounds.
    noise: NoisePool,
}

impl HeClient {
    fn need(&self) -> usize {
        self.job.min_parties.max(MIN_ROUND_PARTIES)
    }

    /// The round the coordinator's `round_message` starts, as this party
    /// derives it from the spec it accepted.
    fn derive(
        &self,
        round: u32,
        round_message: &[u8],
        dim: usize,
        subject: [u8; 32],
        dp: Option<[u8; 32]>,
    ) -> Result<Derived, Error> {
        let rc: wire::RoundConfig = Envelope::body(round_message.to_vec()).decode("coordinator", "round config")?;
        if rc.dim != dim as u64 {
            return Err(coordinator_fault(format!("an he round over {} values; this party sums {dim}", rc.dim)));
        }
        let revocations = super::check_round_parties(
            &self.job,
            &self.party.name,
            &rc.parties,
            self.need(),
            rc.revocation_version,
            self.party.peers.as_ref(),
        )?;
        let s = &self.settings;
        let mismatch = [
            ("dp", rc.dp_digest == dp.map(|d| d.to_vec()).unwrap_or_default()),
            ("bits", rc.bits == s.b()),
            ("clip", rc.clip.to_bits() == s.clip.to_bits()),
            ("max_examples", rc.max_examples == s.max_examples),
        ];
        if let Some((field, _)) = mismatch.iter().find(|(_, ok)| !ok) {
            return Err(coordinator_fault(format!("sent a round {field} that the job spec does not give")));
        }
        let epoch = if rc.keygen {
            if !rc.epoch.is_empty() {
                return Err(coordinator_fault("named a key epoch in a keygen round"));
            }
            None
        } else {
            let id = array32(&rc.epoch, "coordinator", "key epoch")?;
            match &self.epoch {
                Some(e) if e.id == id => {
                    if let Some(p) = rc.parties.iter().find(|p| e.key_parties.binary_search(p).is_err()) {
                        return Err(coordinator_fault(format!("put {p}, who holds no share of the key, in the round")));
                    }
                    Some(id)
                }
                _ => return Err(coordinator_fault("named a key epoch this party holds no share of")),
            }
        };
        Ok(derive_round(&self.job.job_id, round, &rc.parties, rc.keygen, epoch, dim, s, subject, revocations, dp))
    }

    /// Draws encryption randomness and flooding noise for updates of
    /// `values` values under the current key, for as many rounds ahead as
    /// the party's `[training] dp_noise_rounds_ahead` asks (at most 1 GiB,
    /// and no more rounds than the key's decryption budget has left), once
    /// the last batch is used up.
    fn precompute_masks(&mut self, values: usize) {
        let Some(epoch) = &self.epoch else { return };
        let slots = values.div_ceil(he::ring::N).max(1) * he::ring::N;
        if !matches!(&self.ahead, Some(a) if a.epoch == epoch.id && a.slots == slots) {
            self.ahead = Some(Ahead { epoch: epoch.id, slots, masks: VecDeque::new(), floods: VecDeque::new() });
        }
        let Some(ahead) = self.ahead.as_mut() else { return };
        let fits = ((1usize << 30) / (Ahead::BYTES_PER_SLOT * slots)).max(1);
        let used = epoch.share.as_ref().map_or(0, KeyShare::decrypted);
        let budget = epoch.params.key_budget.saturating_sub(used) / slots as u64;
        let rounds = self.job.noise_rounds_ahead.clamp(1, fits).min(usize::try_from(budget).unwrap_or(usize::MAX));
        // Refilled only once used up, as distributed DP's noise is: a batch
        // drawn while the party is idle, not a top-up racing every round.
        let mut rng = Csprng::from_os();
        if ahead.masks.is_empty() {
            ahead.masks.extend((0..rounds).map(|_| epoch.public_key.precompute(values, &mut rng)));
        }
        if ahead.floods.is_empty() {
            ahead.floods.extend((0..rounds).map(|_| he::FloodingNoise::draw(&epoch.params, slots, &mut rng)));
        }
    }

    fn round_clip(&self, template: &confide_dp::ddg::DdgConfig, round_message: &[u8]) -> Result<f64, Error> {
        if self.job.adaptive_clip.is_none() {
            return Ok(template.clip);
        }
        let rc: wire::RoundConfig = Envelope::body(round_message.to_vec()).decode("coordinator", "round config")?;
        super::accepted_dp_clip(&self.job, template, rc.dp_clip)
    }

    /// Starts this party's side of a round with its encoded input.
    fn start(&mut self, derived: Derived, kind: &'static str, input: Vec<u32>) -> Result<Envelope, Error> {
        self.round = None;
        let input = Zeroizing::new(input);
        if derived.keygen {
            let mut rng = Csprng::from_os();
            let (secret, public_share) = DealerSecret::generate(&crp(&derived.epoch), &mut rng);
            let public_share = public_share.to_bytes();
            let dh = DhSecret::generate(&mut OsRng);
            let dh_public = dh.public();
            let dh_proof =
                dh.prove_possession(&possession_context(&derived.binding, &self.party.name), &mut OsRng).to_bytes();
            let commitment = public_share_commitment(&derived.binding, &self.party.name, &public_share);
            let signature = self.party.signer.sign(&commit_transcript(
                &derived.binding,
                &self.party.name,
                &commitment,
                &dh_public,
                &dh_proof,
            ))?;
            let commit = wire::KeyCommit {
                party: self.party.name.clone(),
                commitment: commitment.to_vec(),
                dh_public: dh_public.to_vec(),
                signature,
                certificate: Vec::new(),
                dh_proof: dh_proof.to_vec(),
            };
            self.round =
                Some(ClientRound { derived, kind, input, stage: ClientStage::Committed { secret, dh, public_share } });
            return Ok(Envelope::encode(&commit));
        }
        let (envelope, c0, c1) = self.encrypt(&derived, &input, Vec::new())?;
        self.round = Some(ClientRound { derived, kind, input, stage: ClientStage::Uploaded { c0, c1 } });
        Ok(envelope)
    }

    /// Encrypts `input` under the epoch's key; the signed upload record (with
    /// this party's complaints about its key shares, if any) and the ciphertext.
    fn encrypt(
        &mut self,
        derived: &Derived,
        input: &[u32],
        complaints: Vec<wire::KeyComplaint>,
    ) -> Result<(Envelope, Vec<u64>, Vec<u64>), Error> {
        let epoch = self.epoch.as_ref().ok_or_else(|| coordinator_fault("asked for a ciphertext before a key"))?;
        let slots = input.len().div_ceil(he::ring::N).max(1) * he::ring::N;
        let drawn = match self.ahead.as_mut() {
            Some(a) if a.epoch == epoch.id && a.slots == slots => a.masks.pop_front(),
            _ => None,
        };
        let masks = drawn.unwrap_or_else(|| {
            #[cfg(test)]
            tests::INLINE_MASKS.with(|n| n.set(n.get() + 1));
            epoch.public_key.precompute(input.len().max(1), &mut Csprng::from_os())
        });
        let ct = masks.encrypt(&epoch.params, input)?;
        self.last_values = Some(input.len().max(1));
        let bytes = ct.to_bytes(&epoch.params);
        let mut upload = wire::Upload {
            party: self.party.name.clone(),
            fingerprint: epoch.fingerprint.to_vec(),
            c0_hash: c0_hash(&ct.c0).to_vec(),
            c1_hash: c1_hash(&ct.c1).to_vec(),
            bytes: bytes.len() as u64,
            signature: Vec::new(),
            complaints_hash: complaints_hash(&derived.binding, &self.party.name, &complaints),
            min_contributors: u32::try_from(self.settings.min_contributors(&self.job)).unwrap_or(u32::MAX),
            ..Default::default()
        };
        upload.signature = self.party.signer.sign(&upload_transcript(&derived.binding, &upload))?;
        upload.complaints = complaints;
        Ok((framed(&upload, &bytes), ct.c0, ct.c1))
    }

    fn step(&mut self, round: u32, stage: StageName, message: Envelope) -> Result<Envelope, Error> {
        let max = self.job.max_parties;
        let mut r = match self.round.take() {
            Some(r) if r.derived.round == round => r,
            other => {
                self.round = other;
                return Err(Error::WrongStage(format!("no he round {round} in progress here")));
            }
        };
        let result = self.advance(&mut r, stage, message, max);
        // A refused step ends the round (its secrets are dropped and
        // zeroized), and so does the decryption share, its last.
        if result.is_ok() && stage != DECRYPT {
            self.round = Some(r);
        }
        result
    }

    fn advance(
        &mut self,
        r: &mut ClientRound,
        stage: StageName,
        message: Envelope,
        max: usize,
    ) -> Result<Envelope, Error> {
        let me = self.party.name.clone();
        let binding = r.derived.binding;
        let placeholder = ClientStage::Hashed {
            commitment: [0; 32],
            contributors: Vec::new(),
            own: Vec::new(),
            c0: Vec::new(),
            c1: Vec::new(),
        };
        match (stage, std::mem::replace(&mut r.stage, placeholder)) {
            (KEY_DEAL, ClientStage::Committed { secret, dh, public_share }) => {
                let list: wire::CommitList = message.decode("coordinator", "commitment list")?;
                if list.commits.len() > max {
                    return Err(coordinator_fault(format!("{} key commitments; at most {max}", list.commits.len())));
                }
                let mut commits = BTreeMap::new();
                let mut dh_proofs = BTreeMap::new();
                for c in list.commits {
                    if !r.derived.parties.contains(&c.party) {
                        return Err(coordinator_fault(format!(
                            "relayed a key commitment of {}, not a party of the round",
                            c.party
                        )));
                    }
                    if c.signature.len() > MAX_SIGNATURE || c.certificate.len() > MAX_CERTIFICATE {
                        return Err(coordinator_fault(format!("an oversized signature or certificate of {}", c.party)));
                    }
                    if c.party != me {
                        self.party.peers.add_peer(&c.party, &c.certificate).map_err(|e| match e {
                            // Lapsed since it passed: a refusal, not the relay's fault.
                            e @ Error::CertificateLapsed { .. } => e,
                            e => coordinator_fault(format!(
                                "relayed a certificate for {} that does not check: {e}",
                                c.party
                            )),
                        })?;
                    }
                    // This party's own commitment is checked against what it made, below.
                    if c.party != me {
                        self.party
                            .peers
                            .verify(
                                &c.party,
                                &commit_transcript(&binding, &c.party, &c.commitment, &c.dh_public, &c.dh_proof),
                                &c.signature,
                            )
                            .map_err(|e| {
                                coordinator_fault(format!(
                                    "relayed a key commitment of {} without its signature ({e})",
                                    c.party
                                ))
                            })?;
                    }
                    let commitment = array32(&c.commitment, "coordinator", "commitment")?;
                    let dh_public = array32(&c.dh_public, "coordinator", "Diffie–Hellman key")?;
                    dleq::check_public(&dh_public, &c.party).map_err(|_| {
                        coordinator_fault(format!("relayed a key commitment of {} with a malformed key", c.party))
                    })?;
                    // Checked lazily, before any complaint about this key
                    // (the coordinator checks every proof before relaying).
                    let dh_proof = dleq::PossessionProof::from_bytes(&c.dh_proof, "coordinator")?;
                    dh_proofs.insert(c.party.clone(), dh_proof);
                    if commits.insert(c.party.clone(), (commitment, dh_public)).is_some() {
                        return Err(coordinator_fault(format!("relayed two key commitments of {}", c.party)));
                    }
                }
                let mine = commits.get(&me).ok_or_else(|| coordinator_fault("left this party's key commitment out"))?;
                if mine.0 != public_share_commitment(&binding, &me, &public_share) || mine.1 != dh.public() {
                    return Err(coordinator_fault("relayed a key commitment for this party that it did not make"));
                }
                let key_floor = self.settings.key_floor(&self.job);
                if commits.len() < key_floor {
                    return Err(coordinator_fault(format!(
                        "a key of {} parties; this party takes part in keys of at least {key_floor} (the job's \
                         minimum, and enough that its corrupt parties stay below the threshold)",
                        commits.len()
                    )));
                }
                let key_parties: Vec<String> = commits.keys().cloned().collect();
                let params =
                    self.settings.params(key_parties.len(), self.settings.corrupt_parties(self.job.party_bound()))?;
                let index =
                    key_parties.binary_search(&me).map_err(|_| coordinator_fault("a key without this party"))?;
                let list = commit_list_digest(
                    &binding,
                    commits.iter().map(|(p, (c, d))| (p.as_str(), c.as_slice(), d.as_slice())),
                );
                let mut rng = Csprng::from_os();
                let mut shares = secret.deal(&params, index, &mut rng)?;
                let own_share = shares.remove(index);
                let mut sealed = Vec::with_capacity(shares.len());
                for s in &shares {
                    let to = &key_parties[s.recipient];
                    let key = share_key(&dh, &commits[to].1, to, &binding, &me, to)?;
                    let plain = Zeroizing::new(s.to_bytes());
                    #[cfg(test)]
                    let plain = tests::dealer_fault(&me, to, plain);
                    let (nonce, ciphertext) = prim::seal(&key, &plain, &share_aad(&binding, &me, to), &mut OsRng)?;
                    let mut share = wire::SealedShare {
                        dealer: me.clone(),
                        recipient: to.clone(),
                        nonce: nonce.to_vec(),
                        ciphertext,
                        signature: Vec::new(),
                    };
                    share.signature = self.party.signer.sign(&sealed_share_transcript(&binding, &list, &share))?;
                    sealed.push(share);
                }
                r.stage = ClientStage::Dealt { dh, own_share, params, key_parties, commits, dh_proofs, list };
                Ok(framed_message(&wire::Deal { public_share, shares: sealed }))
            }
            (KEY_CONFIRM, ClientStage::Dealt { dh, own_share, params, key_parties, commits, dh_proofs, list }) => {
                let delivery: wire::KeyDelivery = unframe_message(message, "coordinator", "key delivery")?;
                if delivery.dealt.len() > key_parties.len() {
                    return Err(coordinator_fault("more dealers than key parties"));
                }
                let mut public_shares = Vec::with_capacity(delivery.dealt.len());
                let mut secret_shares = Vec::with_capacity(delivery.dealt.len());
                let mut complaints = Vec::new();
                let mut dealers = BTreeSet::new();
                for d in delivery.dealt {
                    let Some((dealer, (commitment, dh_public))) = commits.get_key_value(&d.dealer) else {
                        return Err(coordinator_fault(format!(
                            "relayed a dealing of {}, who made no key commitment",
                            d.dealer
                        )));
                    };
                    if public_share_commitment(&binding, dealer, &d.public_share) != *commitment {
                        return Err(coordinator_fault(format!(
                            "relayed a public-key share for {dealer} that {dealer} did not commit to"
                        )));
                    }
                    if !dealers.insert(dealer.clone()) {
                        return Err(coordinator_fault(format!("relayed {dealer}'s dealing twice")));
                    }
                    public_shares.push(PublicKeyShare::from_bytes(&d.public_share, dealer)?);
                    let dealer_index =
                        key_parties.binary_search(dealer).map_err(|_| coordinator_fault("a dealer outside the key"))?;
                    if *dealer == me {
                        secret_shares.push(own_share.clone());
                        continue;
                    }
                    let s = d.share.ok_or_else(|| {
                        coordinator_fault(format!("relayed {dealer}'s dealing without this party's share"))
                    })?;
                    if &s.dealer != dealer || s.recipient != me {
                        return Err(coordinator_fault(format!(
                            "relayed a share of {} for {} as {dealer}'s for this party",
                            s.dealer, s.recipient
                        )));
                    }
                    let nonce: [u8; 12] = s.nonce.as_slice().try_into().map_err(|_| {
                        coordinator_fault(format!("relayed a key share of {dealer} with a malformed nonce"))
                    })?;
                    // The dealer signed what it sealed, and the commitment
                    // list it dealt under (the coordinator checks that
                    // before relaying): a share without its signature over
                    // this party's list was altered in transit, or dealt
                    // under another list than this party was shown.
                    if s.signature.len() > MAX_SIGNATURE
                        || self
                            .party
                            .peers
                            .verify(dealer, &sealed_share_transcript(&binding, &list, &s), &s.signature)
                            .is_err()
                    {
                        return Err(coordinator_fault(format!(
                            "relayed a key share of {dealer} that {dealer} did not sign over the commitment list \
                             this party was shown (altered in transit, or the parties were shown different lists)"
                        )));
                    }
                    let key = share_key(&dh, dh_public, dealer, &binding, dealer, &me)?;
                    let index =
                        key_parties.binary_search(&me).map_err(|_| coordinator_fault("a key without this party"))?;
                    let opened = prim::open(&key, &nonce, &s.ciphertext, &share_aad(&binding, dealer, &me))
                        .and_then(|plain| SecretShare::from_bytes(&plain, dealer_index, index, dealer).ok());
                    let Some(secret_share) = opened else {
                        // Signed by the dealer, sealed to this party's
                        // committed key, and still not opening to a key
                        // share: the dealer sealed it wrongly (a malformed
                        // share as much as a bad seal, so that a dealer
                        // cannot make its recipient refuse the round). This
                        // party proves it to the
                        // coordinator (the pairwise key, with a proof that
                        // it is the one of the two committed keys), encrypts
                        // under the key all the same, and never decrypts
                        // with a share that lacks the dealer's part.
                        let possession = dh_proofs.get(dealer).is_some_and(|proof| {
                            let context = possession_context(&binding, dealer);
                            dleq::verify_possession(dh_public, proof, &context, dealer).is_ok()
                        });
                        if !possession {
                            return Err(coordinator_fault(format!(
                                "relayed a key commitment of {dealer} without a valid proof of possession; no \
                                 complaint is made about it"
                            )));
                        }
                        let context = complaint_context(&binding, dealer, &me);
                        let (shared, proof) = dh.reveal(dh_public, dealer, &context, &mut OsRng)?;
                        complaints.push(wire::KeyComplaint {
                            dealer: dealer.clone(),
                            shared: shared.to_vec(),
                            proof: proof.to_bytes().to_vec(),
                        });
                        continue;
                    };
                    secret_shares.push(secret_share);
                }
                if !dealers.contains(&me) {
                    return Err(coordinator_fault("left this party's own dealing out of the key"));
                }
                if dealers.len() < self.need().max(params.threshold) {
                    return Err(coordinator_fault(format!(
                        "a key dealt by {} parties; at least {} must deal",
                        dealers.len(),
                        self.need().max(params.threshold)
                    )));
                }
                let public_key = PublicKey::assemble(&crp(&r.derived.epoch), &public_shares)?;
                let index =
                    key_parties.binary_search(&me).map_err(|_| coordinator_fault("a key without this party"))?;
                let share = if complaints.is_empty() {
                    Some(KeyShare::assemble(&params, index, &secret_shares, 0)?)
                } else {
                    None
                };
                self.ahead = None;
                self.epoch = Some(ClientEpoch {
                    id: r.derived.epoch,
                    fingerprint: public_key.fingerprint(),
                    params,
                    key_parties,
                    public_key,
                    share,
                });
                let (envelope, c0, c1) = self.encrypt(&r.derived, &r.input, complaints)?;
                r.input.iter_mut().for_each(|v| *v = 0);
                r.stage = ClientStage::Uploaded { c0, c1 };
                Ok(envelope)
            }
            (HASH, stage @ (ClientStage::Uploaded { .. } | ClientStage::Hashed { .. })) => {
                let req: wire::HashRequest = message.decode("coordinator", "hash request")?;
                self.check_contributors(&r.derived, &req.contributors)?;
                let (c0, c1) = match stage {
                    ClientStage::Uploaded { c0, c1 } => (c0, c1),
                    ClientStage::Hashed { contributors, c0, c1, .. } => {
                        // Again only over a smaller sum (a relay group left
                        // out): never a set it was not asked about before.
                        let subset = req.contributors.len() < contributors.len()
                            && req.contributors.iter().all(|p| contributors.binary_search(p).is_ok());
                        if !subset {
                            return Err(coordinator_fault(
                                "asked for a second hash over contributors that are not a subset of the first's",
                            ));
                        }
                        (c0, c1)
                    }
                    _ => return Err(Error::WrongStage("he-hash at this point of the round".into())),
                };
                let commitment = array32(&req.commitment, "coordinator", "aggregate commitment")?;
                let values = linear_hash(&binding, &commitment, &req.contributors).hash(&[&c1]).to_vec();
                let c0_values = if req.grouped.contains(&me) {
                    c0_linear_hash(&binding, &commitment, &req.contributors).hash(&[&c0]).to_vec()
                } else {
                    Vec::new()
                };
                let signature = self.party.signer.sign(&hash_transcript(
                    &binding,
                    &me,
                    &commitment,
                    &req.contributors,
                    &values,
                    &c0_values,
                ))?;
                r.stage =
                    ClientStage::Hashed { commitment, contributors: req.contributors, own: values.clone(), c0, c1 };
                Ok(Envelope::encode(&wire::HashValue { party: me, values, signature, c0_values }))
            }
            (DECRYPT, ClientStage::Hashed { commitment, contributors, own, .. }) => {
                self.decrypt((&r.derived, r.kind), message, &commitment, &contributors, &own)
            }
            (other, _) => Err(Error::WrongStage(format!("{other} at this point of the round"))),
        }
    }

    fn check_contributors(&self, derived: &Derived, contributors: &[String]) -> Result<(), Error> {
        if !contributors.windows(2).all(|w| w[0] < w[1]) {
            return Err(coordinator_fault("a contributor list that is not sorted and unique"));
        }
        if let Some(p) = contributors.iter().find(|p| !derived.parties.contains(p)) {
            return Err(coordinator_fault(format!("counted {p}, not a party of the round, as a contributor")));
        }
        let fewest = self.settings.min_contributors(&self.job);
        if contributors.len() < fewest {
            return Err(coordinator_fault(format!(
                "asked about a sum of {} ciphertexts; this party decrypts only sums of at least {fewest} (the \
                 job's minimum, and two more than its corrupt parties)",
                contributors.len(),
            )));
        }
        Ok(())
    }

    /// Checks a decryption request and answers with this party's flooded
    /// share. Every refusal names the coordinator.
    fn decrypt(
        &mut self,
        (derived, kind): (&Derived, &'static str),
        message: Envelope,
        hashed: &[u8; 32],
        hashed_by: &[String],
        own_hash: &[u64],
    ) -> Result<Envelope, Error> {
        let req: wire::DecryptRequest = message.decode("coordinator", "decryption request")?;
        if req.commitment != hashed.as_slice() || req.contributors != hashed_by {
            return Err(coordinator_fault(
                "asked for the decryption of another aggregate or contributor set than the one this party hashed",
            ));
        }
        let Some(Bulk::Words(words)) = message.bulk else {
            return Err(coordinator_fault("a decryption request without the aggregate"));
        };
        let payload = from_words(&words, req.bytes, "coordinator", "decryption request")?;
        let epoch = self.epoch.as_mut().ok_or_else(|| coordinator_fault("asked for a decryption before a key"))?;
        let binding = derived.binding;
        // The contributors are the ones this party hashed for, which it
        // checked then (round parties, sorted, at least `parties.min`).
        let contributors = req.contributors;
        let commitment = array32(&req.commitment, "coordinator", "aggregate commitment")?;
        let slots = derived.dim.max(1).div_ceil(he::ring::N) * he::ring::N;
        let c1_bytes = he::pack::packed_len(slots, 62);
        if payload.len() != c1_bytes * (1 + req.vanished.len()) {
            return Err(coordinator_fault("a decryption request whose aggregate is not of the round's size"));
        }
        let unpack = |i: usize, what: &str| -> Result<Vec<u64>, Error> {
            let v = he::pack::unpack(&payload[i * c1_bytes..(i + 1) * c1_bytes], slots, 62, what)
                .map_err(|e| coordinator_fault(e.to_string()))?;
            if v.iter().any(|&c| c >= he::ring::Q) {
                return Err(coordinator_fault(format!("{what}: a coefficient not below q")));
            }
            Ok(v)
        };
        let c1 = unpack(0, "aggregate c1")?;
        if aggregate_commitment(&c1) != commitment {
            return Err(coordinator_fault("sent an aggregate that is not the one it committed to"));
        }
        // Every contributor signed an upload under this key in this round.
        let mut uploads = BTreeMap::new();
        for u in req.uploads {
            if u.signature.len() > MAX_SIGNATURE || u.certificate.len() > MAX_CERTIFICATE {
                return Err(coordinator_fault(format!("an oversized signature or certificate of {}", u.party)));
            }
            uploads.insert(u.party.clone(), u);
        }
        for p in &contributors {
            let u =
                uploads.get(p).ok_or_else(|| coordinator_fault(format!("counted {p} without its signed upload")))?;
            // This party's own record matters only through its hash, checked below.
            if *p != self.party.name {
                self.party.peers.add_peer(p, &u.certificate).map_err(|e| match e {
                    e @ Error::CertificateLapsed { .. } => e,
                    e => coordinator_fault(format!("relayed a certificate for {p} that does not check: {e}")),
                })?;
                self.party.peers.verify(p, &upload_transcript(&binding, u), &u.signature).map_err(|_| {
                    coordinator_fault(format!("relayed an upload record of {p} that {p} did not sign for this round"))
                })?;
            }
            if u.fingerprint != epoch.fingerprint {
                return Err(coordinator_fault(format!("counted {p}'s ciphertext under another key")));
            }
            // Each contributor's own floor, as it signed it (a contributor
            // listed as vanished never checked the set itself).
            if contributors.len() < u.min_contributors as usize {
                return Err(coordinator_fault(format!(
                    "asked for the decryption of a sum of {} contributors counting {p}'s ciphertext; {p} signed \
                     for sums of at least {}",
                    contributors.len(),
                    u.min_contributors
                )));
            }
        }
        // The linear hash of Σ c1 must be the sum of the contributors' own.
        let hash = linear_hash(&binding, &commitment, &contributors);
        let hashes: BTreeMap<&str, &wire::HashValue> = req.hashes.iter().map(|h| (h.party.as_str(), h)).collect();
        let mut expected = Vec::with_capacity(contributors.len());
        if req.vanished.contains(&self.party.name) {
            return Err(coordinator_fault("listed this party, which hashed its ciphertext, as vanished"));
        }
        for p in &contributors {
            if *p == self.party.name {
                let v: [u64; he::hash::RHO] =
                    own_hash.try_into().map_err(|_| Error::WrongStage("no hash of this party's own".into()))?;
                expected.push(v);
                continue;
            }
            if let Some(pos) = req.vanished.iter().position(|v| v == p) {
                let theirs = unpack(1 + pos, "a vanished contributor's c1")?;
                if c1_hash(&theirs).as_slice() != uploads[p].c1_hash {
                    return Err(coordinator_fault(format!("relayed a c1 for {p} that is not the one {p} signed")));
                }
                expected.push(hash.hash(&[&theirs]));
                continue;
            }
            let h = hashes
                .get(p.as_str())
                .ok_or_else(|| coordinator_fault(format!("counted {p} without its hash or its c1")))?;
            self.party
                .peers
                .verify(
                    p,
                    &hash_transcript(&binding, p, &commitment, &contributors, &h.values, &h.c0_values),
                    &h.signature,
                )
                .map_err(|_| coordinator_fault(format!("relayed a hash value of {p} that {p} did not sign")))?;
            let v: [u64; he::hash::RHO] = h
                .values
                .as_slice()
                .try_into()
                .ok()
                .filter(|v: &[u64; he::hash::RHO]| v.iter().all(|&x| x < he::ring::Q))
                .ok_or_else(|| coordinator_fault(format!("relayed a hash value of {p} of the wrong size or range")))?;
            expected.push(v);
        }
        if he::hash::sum_hashes(&expected) != hash.hash(&[&c1]) {
            return Err(coordinator_fault(
                "asked for the decryption of an aggregate that is not the sum of the contributors' ciphertexts",
            ));
        }
        // Decryptors: key parties, sorted by key index, this party among them.
        let mut indices = Vec::with_capacity(req.decryptors.len());
        for d in &req.decryptors {
            indices.push(
                epoch
                    .key_parties
                    .binary_search(d)
                    .map_err(|_| coordinator_fault(format!("named {d}, who holds no key share, as a decryptor")))?,
            );
        }
        // A round's sum of a kind, once, or again over the very same
        // contributors (a share lost in transit, a round resumed): two
        // sums of one round over other sets would differ by whoever is not
        // in both. Kept by the party node, not this client, and keyed by
        // what the party derives (not the coordinator's model or config,
        // whose bits it can vary without changing the training).
        if !self.party.released.decrypt_once(&self.job.job_id, derived.round, kind, &contributors) {
            return Err(coordinator_fault(format!(
                "asked for a second decryption of round {}'s {kind} sum over other contributors than the first",
                derived.round
            )));
        }
        let drawn = match self.ahead.as_mut() {
            Some(a) if a.epoch == epoch.id && a.slots == c1.len() => a.floods.pop_front(),
            _ => None,
        };
        let flood = drawn.unwrap_or_else(|| he::FloodingNoise::draw(&epoch.params, c1.len(), &mut Csprng::from_os()));
        let key_share = epoch.share.as_mut().ok_or_else(|| {
            coordinator_fault(
                "asked for a decryption under a key whose share to this party a dealer spoiled (this party complained)",
            )
        })?;
        let share = key_share.decryption_share_with(&epoch.params, &c1, &indices, flood).map_err(|e| match e {
            Error::InvalidInput(m) | Error::BelowThreshold(m) => {
                coordinator_fault(format!("asked for a decryption this party refuses: {m}"))
            }
            other => other,
        })?;
        let bytes = share.to_bytes(&epoch.params);
        Ok(framed(&wire::Framed { bytes: bytes.len() as u64 }, &bytes))
    }
}

impl AggregationClient for HeClient {
    fn contribute(&mut self, round: u32, round_message: &[u8], update: LocalUpdate<'_>) -> Result<Envelope, Error> {
        self.round = None;
        let training = super::training_digest(update.global, update.fit);
        let (derived, input) = if let Some(template) = &self.job.distributed_dp {
            let clip = self.round_clip(template, round_message)?;
            let noisy = NoisyUpdate::with_clip(
                template,
                self.job.adaptive_clip.as_ref(),
                clip,
                &self.job.job_id,
                round,
                update.global,
            )?;
            let derived = self.derive(round, round_message, noisy.words(), training, Some(noisy.digest()))?;
            let noise = self.noise.take_for(&noisy)?;
            (derived, noisy.encode(update.global, &update.local, noise)?)
        } else {
            let dim = WeightedUpdate::words(update.global.num_values());
            let derived = self.derive(round, round_message, dim, training, None)?;
            let s = &self.settings;
            let encoding = WeightedUpdate::new(s.b(), s.clip, s.max_examples, self.job.party_bound())?;
            (derived, encoding.encode(update.global, &update.local, update.num_examples, update.train_loss)?)
        };
        self.start(derived, "fit", input)
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
        let encoding = WideSum::new(self.settings.b(), self.job.party_bound())?;
        let derived = self.derive(round, round_message, encoding.words(layout.values), layout.digest, None)?;
        let input = encoding.encode(values)?;
        self.start(derived, layout.purpose, input)
    }

    fn prepare(&mut self, global: &confide_algorithms::Parameters) {
        // Encryption randomness does not depend on the data: draw it before
        // training, for an update of this model's size under the current
        // key (unless it was drawn after the last round). Under distributed
        // DP the update is the mechanism's padded words, whose number
        // depends only on the model's shape; its noise is drawn here too.
        let words = if self.job.distributed_dp.is_none() {
            WeightedUpdate::words(global.num_values())
        } else {
            match self.noise.prepare(&self.job, global) {
                Some(words) => words,
                None => return,
            }
        };
        self.precompute_masks(words);
    }

    fn precompute(&mut self) {
        // Once this party's part of a round is done, the next round's
        // encryption randomness, while the coordinator finishes the round.
        if self.round.is_none()
            && let Some(values) = self.last_values
        {
            self.precompute_masks(values);
        }
    }

    fn on_step(&mut self, round: u32, stage: StageName, message: Envelope) -> Result<Envelope, Error> {
        self.step(round, stage, message).map_err(|e| match e {
            Error::WrongStage(m) => coordinator_fault(format!("asked for the {stage} step out of order: {m}")),
            other => other,
        })
    }

    fn abandon(&mut self) {
        self.round = None;
    }
}

pub mod relay;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::{Aggregate, Released, training_digest};
    use crate::secagg::testing::{InsecureTagVerifier, identity};
    use confide_algorithms::{FitConfig, Parameters, Tensor, TrainConfig};

    fn fit(round: u32) -> FitConfig {
        FitConfig { round, train: TrainConfig::default() }
    }

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    fn table() -> toml::Table {
        toml::toml! { max_examples = 100 }
    }

    /// A federation of `n` parties in one process: the coordinator's side
    /// and every party's, messages passed by hand.
    struct Fed {
        names: Vec<String>,
        server: Box<dyn AggregationServer>,
        clients: BTreeMap<String, Box<dyn AggregationClient>>,
        /// The current round's message (a relay reads the round's size off it).
        round_message: Vec<u8>,
    }

    /// Rewrites a relay's forwarded message (relay, party, message).
    type RelayHook<'a> = &'a mut dyn FnMut(&str, &str, &mut Envelope);
    /// Rewrites a message at a stage for a party.
    type Hook<'a> = &'a mut dyn FnMut(StageName, &str, &mut Envelope);
    /// Σ nᵢ·Δᵢ, Σ nᵢ, the contributors and who misbehaved.
    type Weighted<'a> = (&'a [f64], f64, &'a [String], &'a [(String, String)]);
    /// What a test expects in the refusal, and the edit to the round config.
    type Edit = (&'static str, Box<dyn Fn(&mut wire::RoundConfig)>);
    /// The binding, commitment and contributors a lying party signs over.
    type Seen = Option<([u8; 32], [u8; 32], Vec<String>)>;

    /// What a test does to the coordinator's messages and the parties' answers.
    #[derive(Default)]
    struct Script<'a> {
        /// Parties that stop answering from this stage on.
        silent: BTreeMap<String, StageName>,
        /// Rewrites a message to a party before it is delivered.
        tamper: Option<Hook<'a>>,
        /// Rewrites a party's answer before the coordinator sees it.
        forge: Option<Hook<'a>>,
        /// Refusals by parties (stage, party, error).
        refusals: Vec<(StageName, String, String)>,
        /// Relays and the parties that dial them: their uploads are summed
        /// by an [`relay::UploadGroup`] before the coordinator sees them.
        relays: Vec<(&'static str, Vec<String>)>,
        /// Rewrites a relay's forwarded messages (relay, party, message).
        relay_forge: Option<RelayHook<'a>>,
        /// When set, the coordinator's rejections of direct uploads (party,
        /// error) are collected here and drop their senders, as the session
        /// does, instead of failing the test's round; so are its rejections
        /// of answers at later stages (which always drop their senders).
        rejected: Option<Vec<(String, String)>>,
    }

    impl Fed {
        fn new(n: usize, min: usize) -> Fed {
            Fed::with_job(JobFacts::new("job", names(n), 100, min, 1 << 20))
        }

        fn with_job(job: JobFacts) -> Fed {
            Fed::with_settings(job, table())
        }

        fn with_settings(job: JobFacts, table: toml::Table) -> Fed {
            let n = job.party_names.len();
            let names = names(n);
            let server = ThresholdHe.server(&table, &job, Box::new(InsecureTagVerifier)).unwrap();
            let clients =
                names.iter().map(|p| (p.clone(), ThresholdHe.client(&table, &job, identity(p)).unwrap())).collect();
            Fed { names, server, clients, round_message: Vec::new() }
        }

        /// A federation whose parties keep what they released in `released`
        /// (by name), as a party node does across a job's sessions.
        fn with_released(job: JobFacts, released: &BTreeMap<String, std::sync::Arc<Released>>) -> Fed {
            let mut fed = Fed::with_job(job.clone());
            for (p, client) in fed.clients.iter_mut() {
                let party = PartyIdentity { released: released[p].clone(), ..identity(p) };
                *client = ThresholdHe.client(&table(), &job, party).unwrap();
            }
            fed
        }

        /// Round `round` over `parties` where party i moves its weights by
        /// `delta(i)` on `n_i = 10(i+1)` examples.
        fn round(
            &mut self,
            round: u32,
            parties: &[String],
            global: &Parameters,
            script: &mut Script<'_>,
        ) -> Result<Aggregate, Error> {
            let fit = fit(round);
            let rm = self.server.begin_round(&RoundInfo { round, parties, global, fit: Some(&fit) })?;
            self.round_message = rm.clone();
            let keygen = Envelope::body(rm.clone()).decode::<wire::RoundConfig>("c", "rc").unwrap().keygen;
            let mut answers = Vec::new();
            for p in parties {
                let i: usize = p[1..].parse().unwrap();
                let local =
                    params(&global.tensors()[0].data.iter().map(|w| w + 0.01 * (i as f32 + 1.0)).collect::<Vec<_>>());
                let update =
                    LocalUpdate { global, fit: &fit, local, num_examples: 10 * (i as u64 + 1), train_loss: Some(1.0) };
                let client = self.clients.get_mut(p).unwrap();
                client.prepare(global);
                let mut m = client.contribute(round, &rm, update)?;
                if let Some(f) = script.forge.as_mut() {
                    f(if keygen { KEY_COMMIT_ANSWER } else { CONTRIBUTE }, p, &mut m);
                }
                answers.push((p.clone(), m));
            }
            if keygen {
                for (p, m) in answers {
                    self.server.on_message(Peer { name: &p, certificate: &[], relay: None }, m)?;
                }
            } else {
                self.uploads(answers, script)?;
            }
            self.drive(round, script)
        }

        /// Delivers uploads, through their relays where the script has them.
        fn uploads(&mut self, answers: Vec<(String, Envelope)>, script: &mut Script<'_>) -> Result<(), Error> {
            let mut direct = Vec::new();
            let mut groups: Vec<(&str, relay::UploadGroup)> = script
                .relays
                .iter()
                .map(|(r, _)| (*r, relay::UploadGroup::new(r, &self.round_message).unwrap()))
                .collect();
            // What a relay cannot add (an upload with key complaints, say) it
            // forwards as it came, as `confide relay` does.
            let mut relayed = Vec::new();
            for (p, m) in answers {
                match script.relays.iter().position(|(_, members)| members.contains(&p)) {
                    Some(i) => {
                        if groups[i].1.add(&p, &[], m.clone()).is_err() {
                            relayed.push((p, m, groups[i].0));
                        }
                    }
                    None => direct.push((p, m)),
                }
            }
            for (relay, group) in groups {
                relayed.extend(group.finish().into_iter().map(|(p, m)| (p, m, relay)));
            }
            if let Some(f) = script.relay_forge.as_mut() {
                for (p, m, relay) in relayed.iter_mut() {
                    f(relay, p, m);
                }
            }
            for (p, m) in direct {
                let result = self.server.on_message(Peer { name: &p, certificate: &[], relay: None }, m);
                match (&mut script.rejected, result) {
                    (Some(rejected), Err(e)) => rejected.push((p.clone(), e.to_string())),
                    (_, result) => result?,
                }
            }
            for (p, m, relay) in relayed {
                let result = self.server.on_message(Peer { name: &p, certificate: &[], relay: Some(relay) }, m);
                match (&mut script.rejected, result) {
                    (Some(rejected), Err(e)) => rejected.push((p.clone(), e.to_string())),
                    (_, result) => result?,
                }
            }
            Ok(())
        }

        fn drive(&mut self, round: u32, script: &mut Script<'_>) -> Result<Aggregate, Error> {
            loop {
                match self.server.close_stage()? {
                    Progress::Done(a) => return Ok(a),
                    Progress::Step { stage, messages, .. } => {
                        let deliveries: Vec<(String, Envelope)> = match messages {
                            Messages::Same { to, message } => to.into_iter().map(|p| (p, message.clone())).collect(),
                            Messages::PerParty(v) => v,
                        };
                        let mut uploads = Vec::new();
                        for (p, mut m) in deliveries {
                            if script.silent.get(&p).is_some_and(|s| self.stage_index(*s) <= self.stage_index(stage)) {
                                continue;
                            }
                            if let Some(t) = script.tamper.as_mut() {
                                t(stage, &p, &mut m);
                            }
                            match self.clients.get_mut(&p).unwrap().on_step(round, stage, m) {
                                Ok(mut answer) => {
                                    if let Some(f) = script.forge.as_mut() {
                                        f(stage, &p, &mut answer);
                                    }
                                    if stage == KEY_CONFIRM {
                                        uploads.push((p.clone(), answer));
                                        continue;
                                    }
                                    // A rejected answer drops its sender, as the session does.
                                    let result = self
                                        .server
                                        .on_message(Peer { name: &p, certificate: &[], relay: None }, answer);
                                    if let (Some(rejected), Err(e)) = (&mut script.rejected, result) {
                                        rejected.push((p.clone(), e.to_string()));
                                    }
                                }
                                Err(e) => script.refusals.push((stage, p.clone(), e.to_string())),
                            }
                        }
                        if !uploads.is_empty() {
                            self.uploads(uploads, script)?;
                        }
                    }
                }
            }
        }

        fn stage_index(&self, s: StageName) -> usize {
            ThresholdHe.stages().iter().position(|x| *x == s).unwrap()
        }
    }

    /// A federation of `n` parties (job minimum 3) whose round 1 dealt the
    /// key epoch, with its names and the zero model of `values` values.
    fn keyed_fed(n: usize, values: usize) -> (Fed, Vec<String>, Parameters) {
        let mut fed = Fed::new(n, 3);
        let names = fed.names.clone();
        let global = params(&vec![0.0; values]);
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        (fed, names, global)
    }

    /// Σ nᵢ·Δᵢ for parties `who` (Δᵢ = 0.01(i+1) on every weight).
    fn expected(who: &[usize]) -> (f64, f64) {
        let num: f64 = who.iter().map(|&i| 10.0 * (i as f64 + 1.0) * 0.01 * (i as f64 + 1.0)).sum();
        let den: f64 = who.iter().map(|&i| 10.0 * (i as f64 + 1.0)).sum();
        (num, den)
    }

    fn weighted(a: &Aggregate) -> Weighted<'_> {
        match a {
            Aggregate::WeightedSum { weighted_delta_sum, total_examples, contributors, misbehaved, .. } => {
                (weighted_delta_sum, *total_examples, contributors, misbehaved)
            }
            other => panic!("he reveals only a sum: {other:?}"),
        }
    }

    #[test]
    fn rounds_sum_exactly_and_reuse_the_key_epoch() {
        let mut fed = Fed::new(5, 3);
        let global = params(&[0.5, -0.25, 0.0]);
        let names = fed.names.clone();
        for round in 1..=2 {
            let a = fed.round(round, &names, &global, &mut Script::default()).unwrap();
            let (sum, total, contributors, misbehaved) = weighted(&a);
            let (num, den) = expected(&[0, 1, 2, 3, 4]);
            assert_eq!(total, den);
            for v in sum {
                assert!((v - num).abs() < 0.05, "{v} vs {num}");
            }
            assert_eq!(contributors, names.as_slice());
            assert!(misbehaved.is_empty());
        }
        // Round 2 reused round 1's key: no key stages, the same epoch.
        let rm = fed
            .server
            .begin_round(&RoundInfo { round: 3, parties: &names, global: &global, fit: Some(&fit(3)) })
            .unwrap();
        let rc: wire::RoundConfig = prost::Message::decode(rm.as_slice()).unwrap();
        assert!(!rc.keygen && rc.epoch.len() == 32);
    }

    #[test]
    fn statistics_are_summed_under_the_same_key() {
        let mut fed = Fed::new(4, 3);
        let names = fed.names.clone();
        let layout = SumLayout::feature_stats(2);
        let rm = fed.server.begin_sum(&SumRound { round: 0, parties: &names, layout: &layout }).unwrap();
        for (i, p) in names.iter().enumerate() {
            let values: Vec<f64> = (0..layout.values).map(|k| (i * 10 + k) as f64 - 7.5).collect();
            let m = fed.clients.get_mut(p).unwrap().contribute_sum(0, &rm, &layout, &values).unwrap();
            fed.server.on_message(Peer { name: p, certificate: &[], relay: None }, m).unwrap();
        }
        let Aggregate::Sum { sums, contributors, .. } = fed.drive(0, &mut Script::default()).unwrap() else { panic!() };
        assert_eq!(contributors.len(), 4);
        for (k, s) in sums.iter().enumerate() {
            let want: f64 = (0..4).map(|i| (i * 10 + k) as f64 - 7.5).sum();
            assert!((s - want).abs() < 1e-6, "{s} vs {want}");
        }
        // The next round (a model) reuses the key dealt for the statistics.
        let global = params(&[0.0; 4]);
        let a = fed.round(1, &names, &global, &mut Script::default()).unwrap();
        assert_eq!(weighted(&a).1, expected(&[0, 1, 2, 3]).1);
    }

    #[test]
    fn contributors_that_vanish_after_uploading_are_still_counted() {
        let mut fed = Fed::new(6, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 2]);
        // Key epoch first, then a round where p5 uploads and is never heard of again.
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut script = Script { silent: [("p5".to_string(), HASH)].into(), ..Script::default() };
        let a = fed.round(2, &names, &global, &mut script).unwrap();
        let (sum, total, contributors, _) = weighted(&a);
        let (num, den) = expected(&[0, 1, 2, 3, 4, 5]);
        assert_eq!((total, contributors.len()), (den, 6));
        assert!((sum[0] - num).abs() < 0.05);
    }
    /// Each upload record carries, signed, the fewest contributors its party
    /// accepts in a sum, so that a contributor listed as vanished (which
    /// never checks the set itself) is held to its own floor too. An honest
    /// coordinator refuses a record whose floor is above the job's, as that
    /// party's doing (its word would otherwise fail every sum); decryptors
    /// refuse a coordinator that skips the check and counts such a
    /// contributor in a smaller sum, naming it (found by review).
    #[test]
    fn a_vanished_contributor_is_not_counted_below_its_own_signed_floor() {
        let job = JobFacts::new("job", names(9), 100, 3, 1 << 20);
        let strict = JobFacts { min_parties: 9, ..job.clone() };
        let with_strict_p5 = || {
            let mut fed = Fed::with_job(job.clone());
            fed.clients.insert("p5".into(), ThresholdHe.client(&table(), &strict, identity("p5")).unwrap());
            fed
        };
        let names = names(9);
        let global = params(&[0.0; 2]);
        // The honest coordinator: p5's record is refused, naming p5.
        let mut fed = with_strict_p5();
        let mut script = Script { rejected: Some(Vec::new()), ..Script::default() };
        let _ = fed.round(1, &names, &global, &mut script);
        let rejected = script.rejected.unwrap_or_default();
        assert!(
            rejected.iter().any(|(p, e)| p == "p5" && e.contains("signed for sums of at least 9 contributors")),
            "{rejected:?}"
        );
        // A coordinator that skips its checks of the floors: p4's upload is
        // refused (it sent an empty one), p5 uploads and is listed as
        // vanished, a sum of eight below p5's nine: the decryptors refuse.
        tests::IGNORE_SIGNED_FLOORS.with(|f| f.set(true));
        let mut fed = with_strict_p5();
        let first = fed.round(1, &names, &global, &mut Script::default());
        let mut spoil_p4 = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == CONTRIBUTE && p == "p4" {
                m.body.clear();
            }
        };
        let mut script = Script {
            silent: [("p5".to_string(), HASH)].into(),
            forge: Some(&mut spoil_p4),
            rejected: Some(Vec::new()),
            ..Script::default()
        };
        let outcome = fed.round(2, &names, &global, &mut script);
        tests::IGNORE_SIGNED_FLOORS.with(|f| f.set(false));
        first.unwrap();
        assert!(outcome.is_err(), "decrypted below the floor: {outcome:?}");
        assert!(
            script.refusals.iter().any(|(stage, _, e)| *stage == DECRYPT
                && e.contains("counting p5's ciphertext; p5 signed for sums of at least 9")),
            "{:?}",
            script.refusals
        );
    }

    fn relays() -> Vec<(&'static str, Vec<String>)> {
        vec![("edge-a", vec!["p0".into(), "p1".into(), "p2".into()]), ("edge-b", vec!["p3".into(), "p4".into()])]
    }

    #[test]
    fn relay_group_sums_are_counted_with_every_member() {
        // Two relays (3 and 2 parties) and two parties that dial the
        // coordinator directly; the keygen round's uploads (answers to
        // he-key-confirm) and a later round's go through the relays.
        let mut fed = Fed::new(7, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 3]);
        let mut sizes = Vec::new();
        let mut forge = |_: &str, p: &str, m: &mut Envelope| {
            sizes.push((
                p.to_owned(),
                m.bulk.as_ref().map_or(0, |b| match b {
                    Bulk::Words(w) => w.len(),
                    _ => 0,
                }),
            ))
        };
        // Only relay-group members pay for a hash of their c0.
        let mut c0_hashed = BTreeMap::new();
        let mut seen = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == HASH {
                let hv: wire::HashValue = m.decode("t", "t").unwrap();
                c0_hashed.insert(p.to_owned(), hv.c0_values.len());
            }
        };
        for round in 1..=2 {
            let mut script =
                Script { relays: relays(), relay_forge: Some(&mut forge), forge: Some(&mut seen), ..Script::default() };
            let a = fed.round(round, &names, &global, &mut script).unwrap();
            assert!(script.refusals.is_empty(), "{:?}", script.refusals);
            let (sum, total, contributors, misbehaved) = weighted(&a);
            let (num, den) = expected(&[0, 1, 2, 3, 4, 5, 6]);
            assert_eq!((total, contributors, misbehaved), (den, &names[..], &[][..]));
            assert!((sum[0] - num).abs() < 0.05, "round {round}: {} vs {num}", sum[0]);
        }
        let rho = he::hash::RHO;
        assert_eq!(c0_hashed.values().copied().collect::<Vec<_>>(), [rho, rho, rho, rho, rho, 0, 0]);
        // One ciphertext-sized message per relay and round; members' records come bare.
        let carried: Vec<&(String, usize)> = sizes.iter().filter(|(_, w)| *w > 0).collect();
        assert_eq!(carried.len(), 4, "{sizes:?}");
        assert_eq!(sizes.len(), 10);
    }

    #[test]
    fn a_relay_group_whose_sum_is_not_its_members_is_left_out_and_the_rest_hash_again() {
        // edge-a changes one coefficient of its c1 sum, or shifts the first
        // coefficient of its c0 sum by one plaintext step (c0 carries the
        // plaintext: the decrypted sum would move by that step if nothing
        // checked it); any change will do, e.g. dropping a member's
        // ciphertext or adding another's twice.
        let job = JobFacts::new("job", names(7), 100, 3, 1 << 20);
        let s = settings_for(&table(), &job).unwrap();
        let p = s.params(7, s.corrupt_parties(7)).unwrap();
        // The group's c0 sum is packed first, its first coefficient in the
        // lowest bits; 2^(k−b) is one plaintext step at the 2^k scale.
        let step = p.switch_bits - p.bits;
        assert!(step < 32);
        for c0 in [true, false] {
            let (mut fed, names, global) = keyed_fed(7, 3);
            let mut forge = |relay: &str, _: &str, m: &mut Envelope| {
                if let (true, Some(Bulk::Words(w))) = (relay == "edge-a", m.bulk.as_mut()) {
                    if c0 {
                        w[0] ^= 1 << step;
                    } else {
                        let at = w.len() - 10;
                        w[at] ^= 1;
                    }
                }
            };
            let mut script = Script { relays: relays(), relay_forge: Some(&mut forge), ..Script::default() };
            let a = fed.round(2, &names, &global, &mut script).unwrap();
            assert!(script.refusals.is_empty(), "{:?}", script.refusals);
            let (sum, total, contributors, misbehaved) = weighted(&a);
            let (num, den) = expected(&[3, 4, 5, 6]);
            assert_eq!((total, contributors), (den, &names[3..]), "c0 changed: {c0}");
            assert!(misbehaved.is_empty(), "nobody is named: {misbehaved:?}");
            assert!((sum[0] - num).abs() < 0.05);
            assert_eq!(fed.server.round_roles().get("left out: relay edge-a"), Some(&names[..3].to_vec()));
        }
    }

    #[test]
    fn a_relay_member_that_vanishes_before_hashing_takes_its_group_out_of_the_sum() {
        let (mut fed, names, global) = keyed_fed(7, 3);
        let mut script = Script { relays: relays(), silent: [("p4".to_string(), HASH)].into(), ..Script::default() };
        let a = fed.round(2, &names, &global, &mut script).unwrap();
        let (sum, total, contributors, misbehaved) = weighted(&a);
        assert!(misbehaved.is_empty(), "nobody is named: {misbehaved:?}");
        let (num, den) = expected(&[0, 1, 2, 5, 6]);
        let kept: Vec<String> = ["p0", "p1", "p2", "p5", "p6"].map(String::from).to_vec();
        assert_eq!((total, contributors), (den, &kept[..]));
        assert!((sum[0] - num).abs() < 0.05);
        // Below the minimum after leaving groups out: a clean failure, no sum.
        let mut fed = Fed::new(5, 4);
        let names = fed.names.clone();
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut script = Script {
            relays: vec![("edge-a", vec!["p0".into(), "p1".into()])],
            silent: [("p1".to_string(), HASH)].into(),
            ..Script::default()
        };
        let e = fed.round(2, &names, &global, &mut script).unwrap_err().to_string();
        assert!(e.contains("edge-a: p0, p1") && e.contains("at least 4"), "{e}");
    }

    #[test]
    fn a_relay_member_that_signs_a_wrong_hash_takes_its_group_out_and_nobody_is_named() {
        // p1, behind edge-a with p0 and p2, signs (itself) a linear hash that
        // is not its ciphertext's. The coordinator holds only the group's
        // sum, so it cannot tell p1's fault from the relay's: the group
        // leaves the round, the rest hash again, and nobody is named.
        let (mut fed, names, global) = keyed_fed(7, 3);
        let rm2 = fed
            .server
            .begin_round(&RoundInfo { round: 2, parties: &names, global: &global, fit: Some(&fit(2)) })
            .unwrap();
        let binding = HeClientView::of_round(&fed, &rm2, &global, &fit(2), 2).0;
        let request: std::cell::RefCell<Option<([u8; 32], Vec<String>)>> = Default::default();
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == HASH {
                let req: wire::HashRequest = m.decode("t", "t").unwrap();
                *request.borrow_mut() = Some((req.commitment.as_slice().try_into().unwrap(), req.contributors));
            }
        };
        let lied = std::cell::Cell::new(0);
        let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == HASH && p == "p1" {
                let mut hv: wire::HashValue = m.decode("t", "t").unwrap();
                hv.values[0] = (hv.values[0] + 1) % he::ring::Q;
                let (commitment, contributors) = request.borrow().clone().unwrap();
                let t = hash_transcript(&binding, "p1", &commitment, &contributors, &hv.values, &hv.c0_values);
                use crate::secagg::protocol::IdentitySigner;
                hv.signature = crate::secagg::testing::InsecureTagSigner("p1".into()).sign(&t).unwrap();
                *m = Envelope::encode(&hv);
                lied.set(lied.get() + 1);
            }
        };
        let mut script =
            Script { relays: relays(), tamper: Some(&mut tamper), forge: Some(&mut forge), ..Script::default() };
        let a = fed.round(2, &names, &global, &mut script).unwrap();
        // (Asked again with the rest, as every live key party is, since
        // decryptors are chosen among those who answer.)
        assert!(lied.get() >= 1);
        assert!(script.refusals.is_empty(), "{:?}", script.refusals);
        let (sum, total, contributors, misbehaved) = weighted(&a);
        let (num, den) = expected(&[3, 4, 5, 6]);
        assert_eq!((total, contributors), (den, &names[3..]));
        assert!((sum[0] - num).abs() < 0.05);
        assert!(misbehaved.is_empty(), "{misbehaved:?}");
        assert_eq!(fed.server.round_roles().get("left out: relay edge-a"), Some(&names[..3].to_vec()));
    }

    #[test]
    fn a_relay_cannot_count_a_party_twice_or_forward_a_record_that_does_not_check() {
        let global = params(&[0.0; 3]);
        let uploads = |fed: &mut Fed| -> Vec<(String, Envelope)> {
            let fit = fit(2);
            let names = fed.names.clone();
            let rm = fed
                .server
                .begin_round(&RoundInfo { round: 2, parties: &names, global: &global, fit: Some(&fit) })
                .unwrap();
            fed.round_message = rm.clone();
            names
                .iter()
                .map(|p| {
                    let local = params(&[0.1; 3]);
                    let update = LocalUpdate { global: &global, fit: &fit, local, num_examples: 10, train_loss: None };
                    (p.clone(), fed.clients.get_mut(p).unwrap().contribute(2, &rm, update).unwrap())
                })
                .collect()
        };
        // The round goes on without a refused group; the reason is in its roles.
        let finish = |fed: &mut Fed, rest: Vec<(String, Envelope)>| -> (Vec<String>, BTreeMap<String, Vec<String>>) {
            for (p, m) in rest {
                fed.server.on_message(Peer { name: &p, certificate: &[], relay: None }, m).unwrap();
            }
            let a = fed.drive(2, &mut Script::default()).unwrap();
            (weighted(&a).2.to_vec(), fed.server.round_roles())
        };
        let left_out = |roles: &BTreeMap<String, Vec<String>>| -> (String, Vec<String>) {
            roles
                .iter()
                .find(|(k, _)| k.starts_with("left out: relay edge-a"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .unwrap()
        };
        // edge-a's group of the first two uploads: its leader and message.
        let group_of_two = |fed: &Fed, ups: &mut Vec<(String, Envelope)>| -> (String, Envelope) {
            let mut g = relay::UploadGroup::new("edge-a", &fed.round_message).unwrap();
            for (p, m) in ups.drain(..2) {
                g.add(&p, &[], m).unwrap();
            }
            g.finish().pop().unwrap()
        };
        // A group that repeats a direct upload: left out (its leader not
        // dropped for it), naming the relay and the party counted twice.
        let mut fed = Fed::new(6, 3);
        let names = fed.names.clone();
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut ups = uploads(&mut fed);
        fed.server.on_message(Peer { name: "p0", certificate: &[], relay: None }, ups[0].1.clone()).unwrap();
        let (leader, m) = group_of_two(&fed, &mut ups);
        fed.server.on_message(Peer { name: &leader, certificate: &[], relay: Some("edge-a") }, m).unwrap();
        let (contributors, roles) = finish(&mut fed, ups);
        assert_eq!(contributors, ["p0", "p2", "p3", "p4", "p5"]);
        let (why, members) = left_out(&roles);
        assert!(why.contains("edge-a") && why.contains("p0") && why.contains("twice"), "{why}");
        assert_eq!(members, ["p1"]);
        // A member's record the relay altered (another c1 hash): left out, naming the relay.
        let mut fed = Fed::new(6, 3);
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut ups = uploads(&mut fed);
        let (leader, mut m) = group_of_two(&fed, &mut ups);
        let mut rec: wire::Upload = m.decode("t", "t").unwrap();
        rec.group[0].c1_hash[0] ^= 1;
        m.body = prost::Message::encode_to_vec(&rec);
        fed.server.on_message(Peer { name: &leader, certificate: &[], relay: Some("edge-a") }, m).unwrap();
        let (contributors, roles) = finish(&mut fed, ups);
        assert_eq!(contributors, ["p2", "p3", "p4", "p5"]);
        let (why, members) = left_out(&roles);
        assert!(why.contains("relay edge-a forwarded a record of p0"), "{why}");
        assert_eq!(members, ["p0", "p1"]);
        // A group under a relay's name on a stream another relay carries:
        // left out, whoever summed it.
        let mut fed = Fed::new(6, 3);
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut ups = uploads(&mut fed);
        let (leader, m) = group_of_two(&fed, &mut ups);
        fed.server.on_message(Peer { name: &leader, certificate: &[], relay: Some("edge-b") }, m).unwrap();
        let (contributors, roles) = finish(&mut fed, ups);
        assert_eq!(contributors, ["p2", "p3", "p4", "p5"]);
        let (why, _) = left_out(&roles);
        assert!(why.contains("a group of relay edge-a came"), "{why}");
        // On a party's own stream, a relay's group is that party's doing:
        // refused as its fault. A party that sends one naming honest
        // parties (review finding) gets nobody left out: they upload
        // through their relay afterwards and are counted.
        let mut fed = Fed::new(6, 3);
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut ups = uploads(&mut fed);
        let mut forged: wire::Upload = ups[5].1.decode("t", "t").unwrap();
        forged.relay = "edge-a".into();
        forged.group = vec![ups[0].1.decode("t", "t").unwrap(), ups[1].1.decode("t", "t").unwrap()];
        forged.group_bytes = 1;
        let forged = Envelope::encode(&forged);
        let e = fed.server.on_message(Peer { name: "p5", certificate: &[], relay: None }, forged).unwrap_err();
        assert!(matches!(&e, Error::PeerMisbehaved { party, .. } if party == "p5"), "{e}");
        assert!(e.to_string().contains("on its own stream"), "{e}");
        ups.remove(5);
        let (leader, m) = group_of_two(&fed, &mut ups);
        fed.server.on_message(Peer { name: &leader, certificate: &[], relay: Some("edge-a") }, m).unwrap();
        let (contributors, roles) = finish(&mut fed, ups);
        assert_eq!(contributors, ["p0", "p1", "p2", "p3", "p4"], "{roles:?}");
        assert!(!roles.keys().any(|k| k.starts_with("left out")), "{roles:?}");
        // A relay that forwards its members' records but not the group's
        // sum: the members are left out, named (not silently missing).
        let mut fed = Fed::new(6, 3);
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let mut ups = uploads(&mut fed);
        let mut g = relay::UploadGroup::new("edge-a", &fed.round_message).unwrap();
        for (p, m) in ups.drain(..2) {
            g.add(&p, &[], m).unwrap();
        }
        let mut out = g.finish();
        let (leader, _) = out.pop().unwrap();
        for (p, m) in out {
            fed.server.on_message(Peer { name: &p, certificate: &[], relay: Some("edge-a") }, m).unwrap();
        }
        let (contributors, roles) = finish(&mut fed, ups);
        assert_eq!(contributors, ["p2", "p3", "p4", "p5"]);
        let missing = roles.get("left out: relay edge-a (no group sum came)").cloned().unwrap_or_default();
        assert!(!missing.is_empty() && !missing.contains(&leader), "{roles:?}");
        // Through its relay, such a group is refused and left out, but the
        // parties it names that then upload on their own are counted.
        let mut fed = Fed::new(6, 3);
        fed.round(1, &names, &global, &mut Script::default()).unwrap();
        let ups = uploads(&mut fed);
        let mut forged: wire::Upload = ups[5].1.decode("t", "t").unwrap();
        forged.relay = "edge-a".into();
        forged.group = vec![ups[2].1.decode("t", "t").unwrap(), ups[3].1.decode("t", "t").unwrap()];
        forged.group_bytes = 1;
        let forged = Envelope::encode(&forged);
        fed.server.on_message(Peer { name: "p5", certificate: &[], relay: Some("edge-a") }, forged).unwrap();
        let rest: Vec<_> = ups.into_iter().take(5).collect();
        let (contributors, roles) = finish(&mut fed, rest);
        assert_eq!(contributors, ["p0", "p1", "p2", "p3", "p4"], "{roles:?}");
        let (_, members) = left_out(&roles);
        assert_eq!(members, ["p5"], "{roles:?}");
        // The relay refuses an upload that is not one, naming its sender.
        let mut g = relay::UploadGroup::new("edge-a", &fed.round_message).unwrap();
        let e = g.add("p3", &[], Envelope::body(vec![1, 2, 3])).unwrap_err().to_string();
        assert!(e.contains("p3"), "{e}");
        // Or whose bytes are not the ones its record signs.
        let (p, mut m) = uploads(&mut fed).remove(0);
        if let Some(Bulk::Words(w)) = m.bulk.as_mut() {
            w[3] ^= 1;
        }
        let e = g.add(&p, &[], m).unwrap_err().to_string();
        assert!(e.contains(&p) && e.contains("signed upload record"), "{e}");
    }

    #[test]
    fn decryption_fails_cleanly_below_the_threshold() {
        // n = 5, γ = 0.1: τ = 3, a checked decryption needs 4 answers.
        let (mut fed, names, global) = keyed_fed(5, 2);
        let silent = [("p0".to_string(), DECRYPT), ("p1".to_string(), DECRYPT)].into();
        let err = fed.round(2, &names, &global, &mut Script { silent, ..Script::default() }).unwrap_err();
        assert!(matches!(err, Error::BelowThreshold(_)), "{err}");
        // One silent decryptor of τ + 2 asked: still a checked sum.
        let silent = [("p1".to_string(), DECRYPT)].into();
        let a = fed.round(3, &names, &global, &mut Script { silent, ..Script::default() }).unwrap();
        assert_eq!(weighted(&a).1, expected(&[0, 1, 2, 3, 4]).1);
    }

    /// A decryptor that sends a bad share is suspected (listed in the
    /// round's roles, its share not combined), not excluded: a contributor
    /// can make an honest decryptor look the same
    /// (`a_contributor_can_imitate_a_bad_decryption_share_so_it_is_only_suspected`).
    #[test]
    fn a_bad_decryption_share_is_suspected_and_the_sum_still_right() {
        let mut fed = Fed::new(6, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 2]);
        let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == DECRYPT
                && p == "p2"
                && let Some(Bulk::Words(w)) = m.bulk.as_mut()
            {
                w[0] ^= 1 << 20;
            }
        };
        let mut script = Script { forge: Some(&mut forge), ..Script::default() };
        let a = fed.round(1, &names, &global, &mut script).unwrap();
        let (sum, _, _, misbehaved) = weighted(&a);
        assert!((sum[0] - expected(&[0, 1, 2, 3, 4, 5]).0).abs() < 0.05);
        assert!(misbehaved.is_empty(), "{misbehaved:?}");
        // The status lists the decryptors whose shares were combined (not
        // p2) and the suspected one.
        let mut roles = fed.server.round_roles();
        assert_eq!(roles.remove("suspected decryptors"), Some(vec!["p2".to_string()]));
        let decryptors = roles.remove("decryptors").unwrap();
        assert!(decryptors.len() >= 4 && !decryptors.contains(&"p2".to_string()), "{decryptors:?}");
        // p2 stays in the job and the next round, under a new key, sums everyone.
        let a = fed.round(2, &names, &global, &mut Script::default()).unwrap();
        let rc: wire::RoundConfig = prost::Message::decode(fed.round_message.as_slice()).unwrap();
        assert!(rc.keygen, "a new key after a decryption that did not check whole");
        assert_eq!(weighted(&a).2, &names[..]);
        assert!(!fed.server.round_roles().contains_key("suspected decryptors"));
    }

    /// Runs round 1 (the key epoch) and round 2 with `tamper` rewriting the
    /// coordinator's messages; the parties' refusals.
    fn refusals_under(
        n: usize,
        tamper: &mut dyn FnMut(StageName, &str, &mut Envelope),
    ) -> Vec<(StageName, String, String)> {
        let mut fed = Fed::new(n, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 2]);
        let mut script = Script { tamper: Some(tamper), ..Script::default() };
        let _ = fed.round(1, &names, &global, &mut script);
        script.refusals
    }

    fn edit_request(m: &mut Envelope, f: impl FnOnce(&mut wire::DecryptRequest, &mut Vec<u8>)) {
        let req: wire::DecryptRequest = m.decode("test", "request").unwrap();
        let Some(Bulk::Words(w)) = m.bulk.take() else { panic!() };
        let mut payload = from_words(&w, req.bytes, "test", "payload").unwrap().into_owned();
        let mut req = req;
        f(&mut req, &mut payload);
        req.bytes = payload.len() as u64;
        *m = framed(&req, &payload);
    }

    #[test]
    fn a_decryption_of_one_partys_ciphertext_is_refused_naming_the_coordinator() {
        // The coordinator keeps p0's c1 (read off p0's upload) aside and,
        // after the parties hashed for the real sum, asks for its decryption
        // in the sum's place, committed to as the aggregate: each party
        // refuses an aggregate other than the one it hashed for. (Committing
        // to p0's c1 before the hash stage is the next test's attack.)
        let (mut fed, names, global) = keyed_fed(5, 2);
        let c1_of_p0: std::cell::RefCell<Option<Vec<u64>>> = Default::default();
        let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == CONTRIBUTE && p == "p0" {
                *c1_of_p0.borrow_mut() = Some(c1_of_upload(m));
            }
        };
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == DECRYPT {
                let own = c1_of_p0.borrow().clone().expect("p0 uploaded");
                edit_request(m, |req, payload| {
                    let len = payload.len() / (1 + req.vanished.len());
                    let mut packed = Vec::new();
                    he::pack::pack(&own, 62, &mut packed);
                    assert_eq!(packed.len(), len, "one block");
                    assert_ne!(&payload[..len], &packed[..], "the sum is not p0's c1");
                    payload[..len].copy_from_slice(&packed);
                    req.commitment = aggregate_commitment(&own).to_vec();
                });
            }
        };
        let mut script = Script { forge: Some(&mut forge), tamper: Some(&mut tamper), ..Script::default() };
        assert!(fed.round(2, &names, &global, &mut script).is_err(), "nobody decrypted p0's ciphertext");
        let decrypt: Vec<_> = script.refusals.iter().filter(|(s, _, _)| *s == DECRYPT).collect();
        assert_eq!(decrypt.len(), 5, "{:?}", script.refusals);
        assert!(
            decrypt
                .iter()
                .all(|(_, _, e)| e.contains("party coordinator misbehaved") && e.contains("another aggregate")),
            "{decrypt:?}"
        );
    }

    #[test]
    fn a_sum_that_is_not_the_contributors_is_refused() {
        // The coordinator replaces Σ c1 by c1 of a sum it chose, with a
        // matching commitment, after the parties hashed for the real one:
        // each refuses an aggregate other than the one it hashed.
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == DECRYPT {
                edit_request(m, |req, payload| {
                    let len = payload.len() / (1 + req.vanished.len());
                    let slots = len * 8 / 62;
                    let mut c1 = he::pack::unpack(&payload[..len], slots, 62, "c1").unwrap();
                    c1[7] = (c1[7] + 1) % he::ring::Q;
                    let mut packed = Vec::new();
                    he::pack::pack(&c1, 62, &mut packed);
                    payload[..len].copy_from_slice(&packed);
                    req.commitment = aggregate_commitment(&c1).to_vec();
                });
            }
        };
        let r = refusals_under(5, &mut tamper);
        let decrypt: Vec<_> = r.iter().filter(|(s, _, _)| *s == DECRYPT).collect();
        assert!(!decrypt.is_empty(), "{r:?}");
        assert!(
            decrypt
                .iter()
                .all(|(_, _, e)| e.contains("party coordinator misbehaved") && e.contains("another aggregate")),
            "{decrypt:?}"
        );
    }

    #[test]
    fn sums_of_fewer_than_min_parties_and_made_up_contributors_are_refused() {
        for edit in 0..3 {
            let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
                if stage == HASH {
                    let mut req: wire::HashRequest = m.decode("t", "t").unwrap();
                    match edit {
                        0 => req.contributors.truncate(2),
                        1 => req.contributors.push("zz-sybil".into()),
                        _ => req.contributors.reverse(),
                    }
                    *m = Envelope::encode(&req);
                }
            };
            let r = refusals_under(5, &mut tamper);
            let hash: Vec<_> = r.iter().filter(|(s, _, _)| *s == HASH).collect();
            assert!(!hash.is_empty(), "edit {edit}: {r:?}");
            assert!(hash.iter().all(|(_, _, e)| e.contains("coordinator")), "{hash:?}");
        }
    }

    /// Up to 2 of 7 parties corrupt (corrupt_fraction 0.3): a sum of the
    /// job's minimum of 3 could hold one honest update beside 2 corrupt
    /// ones, which the coalition would subtract. Each party hashes and
    /// decrypts only sums of at least 4 (two honest updates), naming the
    /// coordinator. (A job always has room for that: corrupt_fraction is
    /// below 1/3, and a job at least 3 parties.)
    #[test]
    fn a_sum_of_fewer_than_two_more_than_the_corrupt_parties_is_refused() {
        let settings = toml::toml! {
            max_examples = 100
            corrupt_fraction = 0.3
        };
        // Hash requests over the first `kept` contributors: 3 is refused by
        // every party; 4 (the control) passes that check.
        for kept in [3, 4] {
            let mut fed = Fed::with_settings(JobFacts::new("job", names(7), 100, 3, 1 << 20), settings.clone());
            let names = fed.names.clone();
            let global = params(&[0.0; 2]);
            let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
                if stage == HASH {
                    let mut req: wire::HashRequest = m.decode("t", "t").unwrap();
                    req.contributors.truncate(kept);
                    *m = Envelope::encode(&req);
                }
            };
            let mut script = Script { tamper: Some(&mut tamper), ..Script::default() };
            let _ = fed.round(1, &names, &global, &mut script);
            let refused: Vec<_> =
                script.refusals.iter().filter(|(s, _, e)| *s == HASH && e.contains("at least 4")).collect();
            if kept == 3 {
                assert_eq!(refused.len(), 7, "{:?}", script.refusals);
                assert!(
                    refused
                        .iter()
                        .all(|(_, _, e)| e.contains("party coordinator misbehaved")
                            && e.contains("a sum of 3 ciphertexts")),
                    "{refused:?}"
                );
            } else {
                assert!(refused.is_empty(), "{:?}", script.refusals);
            }
        }
    }

    /// Each contributor's c1 as it uploaded it (one block: the tests' models
    /// are tiny), read off its upload by a forge hook.
    fn c1_of_upload(m: &Envelope) -> Vec<u64> {
        let u: wire::Upload = m.decode("test", "upload").unwrap();
        let Some(Bulk::Words(w)) = &m.bulk else { panic!("an upload without its ciphertext") };
        let bytes = from_words(w, u.bytes, "test", "ciphertext").unwrap();
        let c1_len = he::pack::packed_len(he::ring::N, 62);
        assert!(bytes.len() > c1_len, "one block expected");
        he::pack::unpack(&bytes[bytes.len() - c1_len..], he::ring::N, 62, "c1").unwrap()
    }

    #[test]
    fn a_forged_aggregate_committed_before_hashing_fails_the_linear_hash_naming_the_coordinator() {
        // The attack the linear hash exists for: the coordinator commits, at
        // the hash stage, to c1 of one party's ciphertext (or of a sum over
        // fewer than `parties.min`) under the full contributor list, so that
        // every later check that compares commitments passes, and then asks
        // for that aggregate's decryption with every party's genuine signed
        // record and hash. Only H(aggregate) = Σ signed hashes stands in the
        // way. The honest server in this harness would not go on after the
        // hashes (they do not add up for it either), so the test plays the
        // coordinator from there, by hand.
        for victims in [vec!["p0"], vec!["p0", "p1"]] {
            let (mut fed, names, global) = keyed_fed(5, 2);
            let uploads: std::cell::RefCell<BTreeMap<String, (wire::Upload, Vec<u64>)>> = Default::default();
            let hashes: std::cell::RefCell<Vec<wire::HashValue>> = Default::default();
            let forged = || {
                let mut sum = vec![0u64; he::ring::N];
                for v in &victims {
                    he::ring::add_assign(&mut sum, &uploads.borrow()[*v].1);
                }
                sum
            };
            let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
                if stage == CONTRIBUTE {
                    let u: wire::Upload = m.decode("t", "t").unwrap();
                    uploads.borrow_mut().insert(p.to_owned(), (u, c1_of_upload(m)));
                }
                if stage == HASH {
                    hashes.borrow_mut().push(m.decode("t", "t").unwrap());
                }
            };
            let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
                if stage == HASH {
                    let mut req: wire::HashRequest = m.decode("t", "t").unwrap();
                    assert_eq!(req.contributors, names, "the full list stays");
                    req.commitment = aggregate_commitment(&forged()).to_vec();
                    *m = Envelope::encode(&req);
                }
            };
            let mut script = Script { forge: Some(&mut forge), tamper: Some(&mut tamper), ..Script::default() };
            let _ = fed.round(2, &names, &global, &mut script);
            assert!(script.refusals.is_empty(), "{:?}", script.refusals);
            let mut payload = Vec::new();
            he::pack::pack(&forged(), 62, &mut payload);
            let request = wire::DecryptRequest {
                contributors: names.clone(),
                commitment: aggregate_commitment(&forged()).to_vec(),
                uploads: uploads.borrow().values().map(|(u, _)| u.clone()).collect(),
                hashes: hashes.borrow().clone(),
                decryptors: names.clone(),
                vanished: Vec::new(),
                bytes: payload.len() as u64,
            };
            assert_eq!(request.hashes.len(), 5);
            for p in &names {
                let err = fed
                    .clients
                    .get_mut(p)
                    .unwrap()
                    .on_step(2, DECRYPT, framed(&request, &payload))
                    .map(|_| ())
                    .expect_err("a share for the forged aggregate")
                    .to_string();
                assert!(
                    err.contains("party coordinator misbehaved")
                        && err.contains("not the sum of the contributors' ciphertexts"),
                    "{victims:?}: {p}: {err}"
                );
            }
        }
    }

    #[test]
    fn relayed_records_hashes_and_ciphertexts_that_do_not_check_are_refused_naming_the_coordinator() {
        // Each edit is made to the decryption request of every decryptor; the
        // victim is another contributor than the recipient.
        type RequestEdit = Box<dyn Fn(&str, &mut wire::DecryptRequest, &mut Vec<u8>)>;
        let victim = |p: &str| if p == "p0" { "p1".to_owned() } else { "p0".to_owned() };
        let c1_len = |req: &wire::DecryptRequest, payload: &Vec<u8>| payload.len() / (1 + req.vanished.len());
        let edits: Vec<(&str, RequestEdit)> = vec![
            ("without its signed upload", Box::new(move |p, req, _| req.uploads.retain(|u| u.party != victim(p)))),
            (
                "did not sign for this round",
                Box::new(move |p, req, _| {
                    let u = req.uploads.iter_mut().find(|u| u.party == victim(p)).unwrap();
                    u.bytes += 1;
                }),
            ),
            ("without its hash or its c1", Box::new(move |p, req, _| req.hashes.retain(|h| h.party != victim(p)))),
            (
                "hash value of {q}",
                Box::new(move |p, req, _| {
                    let h = req.hashes.iter_mut().find(|h| h.party == victim(p)).unwrap();
                    h.values[0] = (h.values[0] + 1) % he::ring::Q;
                }),
            ),
            (
                "as vanished",
                Box::new(move |p, req, payload| {
                    let aggregate = payload[..c1_len(req, payload)].to_vec();
                    req.vanished.push(p.to_owned());
                    payload.extend_from_slice(&aggregate);
                }),
            ),
            (
                "that is not the one {q}",
                Box::new(move |p, req, payload| {
                    // The victim "vanished": the coordinator relays a c1 for
                    // it, here the aggregate's, not the victim's own.
                    let aggregate = payload[..c1_len(req, payload)].to_vec();
                    req.hashes.retain(|h| h.party != victim(p));
                    req.vanished.push(victim(p));
                    payload.extend_from_slice(&aggregate);
                }),
            ),
            ("holds no key share", Box::new(|_, req, _| req.decryptors.push("zz-outsider".into()))),
        ];
        for (want, edit) in edits {
            let mut tamper = |stage: StageName, p: &str, m: &mut Envelope| {
                if stage == DECRYPT {
                    edit_request(m, |req, payload| edit(p, req, payload));
                }
            };
            let r = refusals_under(5, &mut tamper);
            let decrypt: Vec<_> = r.iter().filter(|(s, _, _)| *s == DECRYPT).collect();
            assert!(decrypt.len() >= 4, "{want}: {r:?}");
            for (_, p, e) in decrypt {
                // "{q}" in a fragment stands for the victim's name.
                let want = want.replace("{q}", &victim(p));
                assert!(e.contains("party coordinator misbehaved") && e.contains(&want), "{want}: {p}: {e}");
            }
        }
    }

    #[test]
    fn the_round_binding_covers_the_model_the_fit_configuration_and_every_setting() {
        // A coordinator that shows one party another model, learning rate or
        // setting than the rest (to isolate its update in the "sum") gets a
        // different binding for it, and every signature over the round (its
        // upload record, its hash) then fails at the other parties, which
        // refuse naming the coordinator (the test above, "did not sign for
        // this round").
        let job = JobFacts::new("job", names(5), 100, 3, 1 << 20);
        let s = settings_for(&table(), &job).unwrap();
        let parties = names(5);
        let global = params(&[0.0, 1.0]);
        let subject = training_digest(&global, &fit(2));
        let base = |s: &HeSettings, subject: [u8; 32], revocation: u64, dp: Option<[u8; 32]>| {
            derive_round("job", 2, &parties, false, Some([7; 32]), 2, s, subject, revocation, dp).binding
        };
        let binding = base(&s, subject, 0, None);
        let mut other_fit = fit(2);
        other_fit.train.learning_rate *= 0.0;
        let mut variants = vec![
            ("model", base(&s, training_digest(&params(&[0.0, 1.5]), &fit(2)), 0, None)),
            ("fit configuration", base(&s, training_digest(&global, &other_fit), 0, None)),
            ("revocation list", base(&s, subject, 1, None)),
            ("distributed dp", base(&s, subject, 0, Some([1; 32]))),
            ("round", derive_round("job", 3, &parties, false, Some([7; 32]), 2, &s, subject, 0, None).binding),
            ("parties", derive_round("job", 2, &parties[..4], false, Some([7; 32]), 2, &s, subject, 0, None).binding),
            ("epoch", derive_round("job", 2, &parties, false, Some([8; 32]), 2, &s, subject, 0, None).binding),
            ("job", derive_round("other", 2, &parties, false, Some([7; 32]), 2, &s, subject, 0, None).binding),
        ];
        type SettingEdit = Box<dyn Fn(&mut HeSettings)>;
        let settings: [(&str, SettingEdit); 6] = [
            ("bits", Box::new(|s| s.bits = Some(s.b() - 1))),
            ("clip", Box::new(|s| s.clip *= 2.0)),
            ("max_examples", Box::new(|s| s.max_examples += 1)),
            ("corrupt_fraction", Box::new(|s| s.corrupt_fraction += 0.01)),
            ("key_budget_log2", Box::new(|s| s.key_budget_log2 += 1)),
            ("surplus", Box::new(|s| s.surplus += 1)),
        ];
        for (name, edit) in settings {
            let mut changed = s;
            edit(&mut changed);
            variants.push((name, base(&changed, subject, 0, None)));
        }
        for (name, b) in variants {
            assert_ne!(b, binding, "the binding does not cover the {name}");
        }
    }

    /// Two sums of one round over contributor sets that differ by one party
    /// would give that party's update exactly. A party helps decrypt a
    /// round's sum of a kind over one set only: asked again over another,
    /// it refuses, whatever the coordinator changed to look like another
    /// round (the model's bits: -0.0 for 0.0 trains the same) and across
    /// the party's sessions (a coordinator that reconnects and deals a new
    /// key). The same set again (a resumed round) is answered, and gives
    /// the same sum.
    #[test]
    fn a_second_decryption_of_a_round_over_other_parties_is_refused() {
        let refused_at_decryption = |script: &Script<'_>| {
            script.refusals.iter().any(|(s, _, e)| {
                *s == DECRYPT
                    && e.contains("party coordinator misbehaved")
                    && e.contains("second decryption of round 2's fit sum")
            })
        };
        let (mut fed, names, global) = keyed_fed(5, 2);
        // Round 2 over all five, then round 2 again (same model and
        // configuration) without p4: the difference would be p4's update.
        let all = fed.round(2, &names, &global, &mut Script::default()).unwrap();
        let mut script = Script::default();
        let err = fed.round(2, &names[..4], &global, &mut script).unwrap_err();
        assert!(matches!(err, Error::BelowThreshold(_)), "{err}");
        assert!(refused_at_decryption(&script), "{:?}", script.refusals);
        // A model whose bits differ but train the same.
        let same = params(&[-0.0, 0.0]);
        let mut script = Script::default();
        assert!(fed.round(2, &names[..4], &same, &mut script).is_err());
        assert!(refused_at_decryption(&script), "{:?}", script.refusals);
        // The same contributors again, freshly encrypted (a resumed round):
        // the same sum.
        let again = fed.round(2, &names, &global, &mut Script::default()).unwrap();
        assert_eq!(weighted(&again).0, weighted(&all).0);

        // Across sessions: the parties' records outlive their clients. A
        // new coordinator side and new clients sharing each party's record
        // deal a new key in round 2 and ask for its sum without p4.
        let released: BTreeMap<String, std::sync::Arc<Released>> =
            names.iter().map(|p| (p.clone(), std::sync::Arc::default())).collect();
        let job = JobFacts::new("job", names.clone(), 100, 3, 1 << 20);
        let mut first = Fed::with_released(job.clone(), &released);
        first.round(2, &names, &global, &mut Script::default()).unwrap();
        let mut reconnected = Fed::with_released(job.clone(), &released);
        let mut script = Script::default();
        assert!(reconnected.round(2, &names[..4], &global, &mut script).is_err());
        assert!(refused_at_decryption(&script), "{:?}", script.refusals);
        // Without the shared record (as before), the new session answered.
        let mut forgetful = Fed::with_job(job);
        let fresh = forgetful.round(2, &names[..4], &global, &mut Script::default());
        assert!(fresh.is_ok(), "a session without the record decrypts: {fresh:?}");
    }

    #[test]
    fn uploads_with_a_bad_signature_the_wrong_size_or_round_are_rejected_naming_the_sender() {
        let (mut fed, names, global) = keyed_fed(4, 2);
        // An upload for round 2 offered in round 3.
        let rm2 = fed
            .server
            .begin_round(&RoundInfo { round: 2, parties: &names, global: &global, fit: Some(&fit(2)) })
            .unwrap();
        let fit2 = fit(2);
        let update = |i: usize, fit: &FitConfig| -> Parameters {
            let _ = fit;
            params(&[0.1, 0.2 + i as f32])
        };
        let old = fed
            .clients
            .get_mut("p0")
            .unwrap()
            .contribute(
                2,
                &rm2,
                LocalUpdate {
                    global: &global,
                    fit: &fit2,
                    local: update(0, &fit2),
                    num_examples: 10,
                    train_loss: None,
                },
            )
            .unwrap();
        let fit3 = fit(3);
        let rm3 = fed
            .server
            .begin_round(&RoundInfo { round: 3, parties: &names, global: &global, fit: Some(&fit3) })
            .unwrap();
        let err =
            fed.server.on_message(Peer { name: "p0", certificate: &[], relay: None }, old).unwrap_err().to_string();
        assert!(err.contains("party p0 misbehaved") && err.contains("signature"), "{err}");
        // A signature by someone else.
        let u =
            LocalUpdate { global: &global, fit: &fit3, local: update(1, &fit3), num_examples: 11, train_loss: None };
        let mut m = fed.clients.get_mut("p1").unwrap().contribute(3, &rm3, u).unwrap();
        let err = fed
            .server
            .on_message(Peer { name: "p2", certificate: &[], relay: None }, m.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("party p2 misbehaved"), "{err}");
        // A truncated ciphertext.
        if let Some(Bulk::Words(w)) = m.bulk.as_mut() {
            w.truncate(w.len() - 1);
        }
        let err = fed.server.on_message(Peer { name: "p1", certificate: &[], relay: None }, m).unwrap_err().to_string();
        assert!(err.contains("party p1 misbehaved"), "{err}");
        // A plaintext update.
        let plain = Envelope { body: vec![], bulk: Some(Bulk::Params(std::sync::Arc::new(global.clone()))) };
        let err =
            fed.server.on_message(Peer { name: "p3", certificate: &[], relay: None }, plain).unwrap_err().to_string();
        assert!(err.contains("party p3 misbehaved") && err.contains("plaintext"), "{err}");
    }

    #[test]
    fn a_public_share_that_does_not_match_its_commitment_is_refused() {
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == KEY_CONFIRM {
                let mut d: wire::KeyDelivery = unframe_message(m.clone(), "t", "t").unwrap();
                d.dealt[0].public_share[3] ^= 1;
                *m = framed_message(&d);
            }
        };
        let r = refusals_under(4, &mut tamper);
        assert!(
            r.iter().any(|(s, _, e)| *s == KEY_CONFIRM && e.contains("coordinator") && e.contains("did not commit to")),
            "{r:?}"
        );
    }

    /// A sealed key share altered in transit no longer carries its dealer's
    /// signature: its recipient names the coordinator.
    #[test]
    fn a_key_share_altered_in_transit_names_the_coordinator() {
        let mut tamper = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == KEY_CONFIRM && p == "p1" {
                let mut d: wire::KeyDelivery = unframe_message(m.clone(), "t", "t").unwrap();
                let dealt = d.dealt.iter_mut().find(|x| x.dealer == "p0").unwrap();
                dealt.share.as_mut().unwrap().ciphertext[0] ^= 1;
                *m = framed_message(&d);
            }
        };
        let r = refusals_under(4, &mut tamper);
        assert!(
            r.iter().any(|(s, p, e)| *s == KEY_CONFIRM
                && p == "p1"
                && e.contains("party coordinator misbehaved")
                && e.contains("p0 did not sign")),
            "{r:?}"
        );
    }

    /// Round 1 (a keygen round) begun: its round message and the parties'
    /// binding.
    fn keygen_round_begun(fed: &mut Fed) -> (Vec<u8>, [u8; 32]) {
        let names = fed.names.clone();
        let (global, fit1) = (params(&[0.0; 2]), fit(1));
        let rm = fed
            .server
            .begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit1) })
            .unwrap();
        let HeClientView(binding) = HeClientView::of(fed, &rm, &global, &fit1);
        (rm, binding)
    }

    /// `p`'s answer to [`keygen_round_begun`]'s round message `rm`: its key
    /// commitment (each call a fresh start of its side of the key).
    fn key_commitment(fed: &mut Fed, rm: &[u8], p: &str) -> Envelope {
        let (global, fit1) = (params(&[0.0; 2]), fit(1));
        let u =
            LocalUpdate { global: &global, fit: &fit1, local: params(&[0.01; 2]), num_examples: 10, train_loss: None };
        fed.clients.get_mut(p).unwrap().contribute(1, rm, u).unwrap()
    }

    /// Round 1 (a keygen round) begun, every party's commitment given to
    /// the server; returns the round message and the parties' binding.
    fn keygen_round_committed(fed: &mut Fed) -> (Vec<u8>, [u8; 32], [u8; 32]) {
        let names = fed.names.clone();
        let (rm, binding) = keygen_round_begun(fed);
        let mut commits = Vec::new();
        for p in &names {
            let m = key_commitment(fed, &rm, p);
            commits.push(m.decode::<wire::KeyCommit>("t", "t").unwrap());
            fed.server.on_message(Peer { name: p, certificate: &[], relay: None }, m).unwrap();
        }
        commits.sort_by(|a, b| a.party.cmp(&b.party));
        let list = commit_list_digest(
            &binding,
            commits.iter().map(|c| (c.party.as_str(), c.commitment.as_slice(), c.dh_public.as_slice())),
        );
        (rm, binding, list)
    }

    /// p0 deals p1 a share that does not open, under p0's own signature.
    fn seal_wrongly_for_p1(binding: [u8; 32], list: [u8; 32]) -> impl FnMut(StageName, &str, &mut Envelope) {
        move |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == KEY_DEAL && p == "p0" {
                let mut d: wire::Deal = unframe_message(m.clone(), "t", "t").unwrap();
                let share = d.shares.iter_mut().find(|s| s.recipient == "p1").unwrap();
                share.ciphertext[0] ^= 1;
                // Re-signed by p0: a dealer that seals wrongly, not a forgery.
                use crate::secagg::protocol::IdentitySigner;
                share.signature = crate::secagg::testing::InsecureTagSigner("p0".into())
                    .sign(&sealed_share_transcript(&binding, &list, share))
                    .unwrap();
                *m = framed_message(&d);
            }
        }
    }

    /// Test-only stage names for a party's answer to the round message: its
    /// upload, or its key commitment in a key's first round.
    const CONTRIBUTE: StageName = StageName::new("test: upload");
    const KEY_COMMIT_ANSWER: StageName = StageName::new("test: key commitment");

    /// Encryption randomness drawn several rounds ahead is used once each:
    /// with the same input every round, every ciphertext differs (a reused
    /// mask would repeat it) across batch refills, and every sum decrypts
    /// exactly (the flooding noise drawn ahead fits its shares).
    #[test]
    fn randomness_drawn_rounds_ahead_is_used_once_across_refills() {
        let mut job = JobFacts::new("job", names(4), 100, 3, 1 << 20);
        job.noise_rounds_ahead = 3;
        let mut fed = Fed::with_job(job);
        let names = fed.names.clone();
        let global = params(&[0.5, -0.25, 0.0]);
        let mut ciphertexts = BTreeSet::new();
        for round in 1..=8 {
            let mut seen = |stage: StageName, p: &str, m: &mut Envelope| {
                if p == "p0" && (stage == CONTRIBUTE || stage == KEY_CONFIRM) {
                    let u: wire::Upload = m.decode("t", "t").unwrap();
                    assert!(ciphertexts.insert(u.c1_hash), "round {round}: a ciphertext repeated");
                }
            };
            let mut script = Script { forge: Some(&mut seen), ..Script::default() };
            let a = fed.round(round, &names, &global, &mut script).unwrap();
            drop(script);
            let (sum, total, contributors, _) = weighted(&a);
            let (num, den) = expected(&[0, 1, 2, 3]);
            assert_eq!((total, contributors), (den, names.as_slice()));
            assert!(sum.iter().all(|v| (v - num).abs() < 0.05), "round {round}: {sum:?} vs {num}");
        }
        assert_eq!(ciphertexts.len(), 8);
    }

    thread_local! {
        /// Encryptions whose randomness was not drawn ahead (drawn inside
        /// the round instead).
        pub(super) static INLINE_MASKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        /// The coordinator skips its check of the contributors' signed
        /// floors (a coordinator deviating from the protocol).
        pub(super) static IGNORE_SIGNED_FLOORS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Every party, decryptor or not, with or without distributed DP, has
    /// its encryption randomness drawn before the round's contribution once
    /// it holds a key (only the keygen round, with no key yet, draws
    /// inside), and its distributed-DP noise in every round.
    #[test]
    fn every_party_draws_its_randomness_before_the_round() {
        for dp in [false, true] {
            let n = 7;
            let mut job = JobFacts::new("job", names(n), 100, 3, 1 << 20);
            if dp {
                job.distributed_dp = Some(ddg_template(&job));
            }
            let mut fed = Fed::with_job(job);
            let names = fed.names.clone();
            let global = params(&[0.5, -0.25, 0.0]);
            let mut decryptors = BTreeSet::new();
            for round in 1..=4 {
                INLINE_MASKS.with(|c| c.set(0));
                crate::aggregation::update::INLINE_NOISE.with(|c| c.set(0));
                fed.round(round, &names, &global, &mut Script::default()).unwrap();
                let inline = INLINE_MASKS.with(|c| c.get());
                // The keygen round encrypts under a key dealt within it.
                assert_eq!(inline, if round == 1 { n } else { 0 }, "dp {dp}, round {round}");
                // Distributed DP's noise needs no key: drawn ahead from the first round.
                assert_eq!(crate::aggregation::update::INLINE_NOISE.with(|c| c.get()), 0, "dp {dp}, round {round}");
                decryptors.extend(fed.server.round_roles().remove("decryptors").unwrap_or_default());
            }
            // Some party was never asked to decrypt (so never idled after a share).
            assert!(decryptors.len() < n, "{decryptors:?}");
        }
    }

    thread_local! {
        /// (dealer, recipient): the dealer seals that recipient bytes that
        /// are not a key share, correctly encrypted and signed.
        static MALFORMED_SHARE: std::cell::RefCell<Option<(String, String)>> =
            const { std::cell::RefCell::new(None) };
        /// (dealer, recipient): the dealer seals that recipient a well-formed
        /// key share that is wrong (one coefficient off), which no complaint
        /// can show.
        static WRONG_SHARE: std::cell::RefCell<Option<(String, String)>> =
            const { std::cell::RefCell::new(None) };
    }

    /// The test-only fault a dealer applies to a share's plaintext before
    /// sealing it (none unless a test set [`MALFORMED_SHARE`] or [`WRONG_SHARE`]).
    pub(super) fn dealer_fault(dealer: &str, recipient: &str, plain: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
        let hits = |t: &'static std::thread::LocalKey<std::cell::RefCell<Option<(String, String)>>>| {
            t.with(|m| m.borrow().as_ref().is_some_and(|(d, r)| d == dealer && r == recipient))
        };
        if hits(&MALFORMED_SHARE) {
            return Zeroizing::new(vec![0xff; plain.len()]);
        }
        if hits(&WRONG_SHARE) {
            let mut v = he::pack::unpack(&plain, he::ring::N, 62, "share").unwrap();
            v[0] = (v[0] + 1) % he::ring::Q;
            let mut out = Zeroizing::new(Vec::new());
            he::pack::pack(&v, 62, &mut out);
            return out;
        }
        plain
    }

    /// A dealer that seals its recipient a share that opens and is well
    /// formed but wrong: no complaint can show it (there is no commitment to
    /// the dealer's Shamir polynomial), so the recipient's decryption shares
    /// are wrong under that key. They never give a wrong sum: with τ + 2
    /// answers the recipient is *suspected* (listed in the round's roles,
    /// not excluded: the dealer, not the recipient, is at fault here, and a
    /// contributor can cause the same picture), the sum is right and the
    /// next round deals a new key; with τ + 1 the bad share is detected,
    /// the round fails with no sum, and the coordinator forgets the key and
    /// deals a new one.
    #[test]
    fn a_share_that_opens_but_is_wrong_makes_its_recipient_suspected_and_never_gives_a_wrong_sum() {
        WRONG_SHARE.with(|m| *m.borrow_mut() = Some(("p0".into(), "p1".into())));
        let outcome = std::panic::catch_unwind(|| {
            // τ = 3 of 5, all five decrypt (τ + 2): p1 is suspected, the sum is right.
            let mut fed = Fed::new(5, 3);
            let names = fed.names.clone();
            let global = params(&[0.0; 2]);
            for round in 1..=2 {
                let mut script = Script::default();
                let a = fed.round(round, &names, &global, &mut script).unwrap();
                let rc: wire::RoundConfig = prost::Message::decode(fed.round_message.as_slice()).unwrap();
                assert!(rc.keygen, "round {round}: a new key each round whose decryption did not check whole");
                let (sum, _, contributors, misbehaved) = weighted(&a);
                assert_eq!(contributors, &names[..]);
                assert!((sum[0] - expected(&[0, 1, 2, 3, 4]).0).abs() < 0.05, "round {round}: {sum:?}");
                assert!(misbehaved.is_empty(), "round {round}: nobody is excluded on suspicion: {misbehaved:?}");
                let mut roles = fed.server.round_roles();
                assert_eq!(roles.remove("suspected decryptors"), Some(vec!["p1".to_string()]), "round {round}");
                assert!(!roles["decryptors"].contains(&"p1".to_string()), "round {round}: {roles:?}");
            }
            // Only τ + 1 answer (p4 silent at decryption): detected, no sum.
            let mut fed = Fed::new(5, 3);
            let names = fed.names.clone();
            let global = params(&[0.0; 2]);
            let mut script = Script { silent: [("p4".to_string(), DECRYPT)].into(), ..Script::default() };
            let err = fed.round(1, &names, &global, &mut script).unwrap_err();
            assert!(err.to_string().contains("no sum") && err.to_string().contains("cross-check"), "{err}");
            // The next round deals a new key (honest this time) and sums right.
            WRONG_SHARE.with(|m| *m.borrow_mut() = None);
            let a = fed.round(2, &names, &global, &mut Script::default()).unwrap();
            let rc: wire::RoundConfig = prost::Message::decode(fed.round_message.as_slice()).unwrap();
            assert!(rc.keygen, "a new key after a round whose shares could not be reconciled");
            let (sum, _, _, misbehaved) = weighted(&a);
            assert!((sum[0] - expected(&[0, 1, 2, 3, 4]).0).abs() < 0.05);
            assert!(misbehaved.is_empty(), "{misbehaved:?}");
        });
        WRONG_SHARE.with(|m| *m.borrow_mut() = None);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e);
        }
    }

    /// A dealer that seals its recipient bytes that open but are not a key
    /// share (every coefficient above q) cannot make the recipient refuse
    /// the round: the recipient complains as for a share that does not
    /// open, and the coordinator, opening the share itself, convicts the
    /// dealer.
    #[test]
    fn a_dealer_that_seals_a_malformed_share_is_convicted_too() {
        MALFORMED_SHARE.with(|m| *m.borrow_mut() = Some(("p0".into(), "p1".into())));
        let mut fed = Fed::new(5, 3);
        keygen_round_committed(&mut fed);
        let mut script = Script::default();
        let a = fed.drive(1, &mut script);
        MALFORMED_SHARE.with(|m| *m.borrow_mut() = None);
        let a = a.unwrap();
        assert!(script.refusals.is_empty(), "{:?}", script.refusals);
        let (_, _, contributors, misbehaved) = weighted(&a);
        assert_eq!(contributors, &["p0", "p1", "p2", "p3", "p4"]);
        assert!(
            misbehaved.iter().any(|(p, e)| p == "p0" && e.contains("does not open to a key share")),
            "{misbehaved:?}"
        );
        let decryptors = fed.server.round_roles().remove("decryptors").unwrap();
        assert!(!decryptors.contains(&"p1".to_string()), "{decryptors:?}");
    }

    /// A dealer that seals a share wrongly under its own signature (the
    /// coordinator relays it, since the signature checks) is convicted on
    /// its recipient's complaint, which the coordinator checks itself: the
    /// revealed pairwise key carries a Chaum–Pedersen proof against the two
    /// committed keys, and the dealer's signed share does not open under
    /// it. The round still sums everyone (the recipient encrypts under the
    /// public key) but the recipient does not decrypt; the next round deals
    /// a new key without the dealer, and the dealer is in no later round.
    #[test]
    fn a_dealer_that_seals_a_share_wrongly_is_convicted_on_a_checked_complaint() {
        let mut fed = Fed::new(5, 3);
        let (_, binding, list) = keygen_round_committed(&mut fed);
        let mut forge = seal_wrongly_for_p1(binding, list);
        let mut script = Script { forge: Some(&mut forge), ..Script::default() };
        let a = fed.drive(1, &mut script).unwrap();
        assert!(script.refusals.is_empty(), "{:?}", script.refusals);
        let (_, _, contributors, misbehaved) = weighted(&a);
        assert_eq!(contributors, &["p0", "p1", "p2", "p3", "p4"]);
        assert!(
            misbehaved.iter().any(|(p, e)| p == "p0" && e.contains("does not open") && e.contains("p1's complaint")),
            "{misbehaved:?}"
        );
        let decryptors = fed.server.round_roles().remove("decryptors").unwrap();
        assert!(!decryptors.contains(&"p1".to_string()), "{decryptors:?}");
        // Round 2: even if the session lists p0, the round leaves it out and
        // deals a new key.
        let global = params(&[0.0; 2]);
        let fit2 = fit(2);
        let rm = fed
            .server
            .begin_round(&RoundInfo { round: 2, parties: &fed.names.clone(), global: &global, fit: Some(&fit2) })
            .unwrap();
        let rc: wire::RoundConfig = Envelope::body(rm).decode("c", "rc").unwrap();
        assert!(rc.keygen && rc.parties == ["p1", "p2", "p3", "p4"], "{rc:?}");
        let rest: Vec<String> = fed.names[1..].to_vec();
        let a = fed.round(2, &rest, &global, &mut Script::default()).unwrap();
        assert_eq!(weighted(&a).2, &["p1", "p2", "p3", "p4"]);
        assert!(weighted(&a).3.is_empty());
    }

    /// A complaint reveals the pair's Diffie–Hellman value K to the
    /// coordinator (and, behind a relay, to the relay). K opens the two
    /// shares between that pair under that key, which each of the two holds
    /// anyway (the dealer, which sealed wrongly, is corrupt: both were shown
    /// one list, see the split-view test below), and no other pair's share.
    /// (Another key epoch's shares are sealed under fresh Diffie–Hellman
    /// keys, so K says nothing about them.)
    #[test]
    fn a_revealed_pairwise_key_opens_only_that_pairs_two_shares() {
        let mut fed = Fed::new(5, 3);
        let (_, binding, list) = keygen_round_committed(&mut fed);
        let mut seal = seal_wrongly_for_p1(binding, list);
        let deals: std::cell::RefCell<Vec<wire::SealedShare>> = Default::default();
        let revealed: std::cell::RefCell<Option<[u8; 32]>> = Default::default();
        let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == KEY_DEAL {
                // As dealt, before p0's share to p1 is spoiled.
                let d: wire::Deal = unframe_message(m.clone(), "t", "t").unwrap();
                deals.borrow_mut().extend(d.shares);
            }
            seal(stage, p, m);
            if stage == KEY_CONFIRM && p == "p1" {
                let u: wire::Upload = m.decode("t", "t").unwrap();
                assert_eq!(u.complaints.len(), 1);
                *revealed.borrow_mut() = Some(u.complaints[0].shared.as_slice().try_into().unwrap());
            }
        };
        let mut script = Script { forge: Some(&mut forge), ..Script::default() };
        fed.drive(1, &mut script).unwrap();
        let k = revealed.into_inner().expect("p1 complained");
        let deals = deals.into_inner();
        assert_eq!(deals.len(), 5 * 4);
        let opens = |s: &wire::SealedShare, binding: &[u8; 32]| {
            let key = share_key_from(&k, binding, &s.dealer, &s.recipient);
            let nonce: [u8; 12] = s.nonce.as_slice().try_into().unwrap();
            prim::open(&key, &nonce, &s.ciphertext, &share_aad(binding, &s.dealer, &s.recipient)).is_some()
        };
        for s in &deals {
            let pair = [s.dealer.as_str(), s.recipient.as_str()];
            let ours = pair == ["p0", "p1"] || pair == ["p1", "p0"];
            assert_eq!(opens(s, &binding), ours, "{pair:?}");
        }
    }

    /// The split-view attack on key generation: the coordinator starts a
    /// key round twice for p0 (p0 keeps only its second secret and
    /// Diffie–Hellman key) and shows p1 a commitment list with p0's first
    /// commitment. p1 then seals its share to a key p0 no longer holds. Had
    /// p0 complained, it would have revealed its Diffie–Hellman value with
    /// p1, which opens p0's own share to p1, an honest party: enough such
    /// complaints give the coordinator p0's secret. p1 signed its share
    /// over the list it was shown, so p0 refuses at key-confirm, naming the
    /// coordinator, and reveals nothing.
    #[test]
    fn a_coordinator_that_shows_parties_different_commitment_lists_is_named_before_any_complaint() {
        let mut fed = Fed::new(5, 3);
        let names = fed.names.clone();
        let (rm, _) = keygen_round_begun(&mut fed);
        let mut commit = |p: &str| -> wire::KeyCommit { key_commitment(&mut fed, &rm, p).decode("t", "t").unwrap() };
        // p0's first commitment, then the one it keeps.
        let p0_first = commit("p0");
        let commits: Vec<wire::KeyCommit> = names.iter().map(|p| commit(p)).collect();
        assert_ne!(p0_first.dh_public, commits[0].dh_public, "a fresh key for the second start");
        let shown_to = |p: &str| {
            let mut commits = commits.clone();
            if p == "p1" {
                commits[0] = p0_first.clone();
            }
            Envelope::encode(&wire::CommitList { commits })
        };
        let mut deals = BTreeMap::new();
        for p in &names {
            let m = fed.clients.get_mut(p).unwrap().on_step(1, KEY_DEAL, shown_to(p)).unwrap();
            deals.insert(p.clone(), unframe_message::<wire::Deal>(m, "t", "t").unwrap());
        }
        let dealt = names
            .iter()
            .map(|d| wire::Dealt {
                dealer: d.clone(),
                public_share: deals[d].public_share.clone(),
                share: deals[d].shares.iter().find(|s| s.recipient == "p0").cloned(),
            })
            .collect();
        let delivery = framed_message(&wire::KeyDelivery { dealt });
        let answer = fed.clients.get_mut("p0").unwrap().on_step(1, KEY_CONFIRM, delivery);
        let e = answer.map(|m| m.decode::<wire::Upload>("t", "t").map(|u| u.complaints.len())).unwrap_err().to_string();
        assert!(
            e.contains("party coordinator misbehaved")
                && e.contains("relayed a key share of p1")
                && e.contains("the parties were shown different lists"),
            "{e}"
        );
    }

    /// The related-key attack on complaints (found by review): corrupt p0
    /// commits 3·X of honest p2's Diffie–Hellman key X, whose secret it
    /// does not know. Had p1 complained about p0's share (which cannot open
    /// under that key), it would have revealed 3·DH(p1, p2), opening the
    /// key shares p1 and p2 sealed to each other; every complainer likewise
    /// gives up its pair with p2. The coordinator refuses the commitment
    /// (no proof that p0 knows the secret); one that relays it anyway is
    /// named by p1, which makes no complaint.
    #[test]
    fn a_key_made_from_another_partys_gets_no_complaint() {
        use crate::secagg::protocol::IdentitySigner;
        use crate::secagg::testing::InsecureTagSigner;
        use curve25519_dalek::ristretto::CompressedRistretto;
        use curve25519_dalek::scalar::Scalar;
        let mut fed = Fed::new(5, 3);
        let names = fed.names.clone();
        let (rm, binding) = keygen_round_begun(&mut fed);
        let commits: Vec<wire::KeyCommit> =
            names.iter().map(|p| key_commitment(&mut fed, &rm, p).decode("t", "t").unwrap()).collect();
        let victim = CompressedRistretto(commits[2].dh_public.as_slice().try_into().unwrap()).decompress().unwrap();
        let mut related = commits[0].clone();
        related.dh_public = (Scalar::from(3u8) * victim).compress().to_bytes().to_vec();
        let transcript = commit_transcript(&binding, "p0", &related.commitment, &related.dh_public, &related.dh_proof);
        related.signature = InsecureTagSigner("p0".into()).sign(&transcript).unwrap();
        let err = fed
            .server
            .on_message(Peer { name: "p0", certificate: &[], relay: None }, Envelope::encode(&related))
            .unwrap_err();
        assert!(
            matches!(&err, Error::PeerMisbehaved { party, reason } if party == "p0" && reason.contains("proof")),
            "{err}"
        );
        // A coordinator that relays it anyway, to every party but p0 (which
        // would refuse a commitment it did not make); p0 deals as it would,
        // and signs its share to p1 over the list p1 was shown.
        let mut seen_by_others = commits.clone();
        seen_by_others[0] = related;
        let digest = |list: &[wire::KeyCommit]| {
            commit_list_digest(
                &binding,
                list.iter().map(|c| (c.party.as_str(), c.commitment.as_slice(), c.dh_public.as_slice())),
            )
        };
        let mut deals = BTreeMap::new();
        for p in &names {
            let list = if p == "p0" { &commits } else { &seen_by_others };
            let shown = Envelope::encode(&wire::CommitList { commits: list.clone() });
            let m = fed.clients.get_mut(p).unwrap().on_step(1, KEY_DEAL, shown).unwrap();
            deals.insert(p.clone(), unframe_message::<wire::Deal>(m, "t", "t").unwrap());
        }
        let to_p1 = deals.get_mut("p0").unwrap().shares.iter_mut().find(|s| s.recipient == "p1").unwrap();
        to_p1.signature = InsecureTagSigner("p0".into())
            .sign(&sealed_share_transcript(&binding, &digest(&seen_by_others), to_p1))
            .unwrap();
        let dealt = names
            .iter()
            .map(|d| wire::Dealt {
                dealer: d.clone(),
                public_share: deals[d].public_share.clone(),
                share: deals[d].shares.iter().find(|s| s.recipient == "p1").cloned(),
            })
            .collect();
        let answer =
            fed.clients.get_mut("p1").unwrap().on_step(1, KEY_CONFIRM, framed_message(&wire::KeyDelivery { dealt }));
        let e = answer.map(|m| m.decode::<wire::Upload>("t", "t").map(|u| u.complaints.len())).unwrap_err().to_string();
        assert!(
            e.contains("party coordinator misbehaved") && e.contains("proof of possession") && e.contains("p0"),
            "{e}"
        );
    }

    /// The conviction stands when the round it came in fails: the key the
    /// convicted dealer took part in is not used again, and it is left out
    /// of the next round, which deals a new key.
    #[test]
    fn a_key_with_a_convicted_dealer_is_replaced_even_when_its_round_fails() {
        let mut fed = Fed::new(5, 3);
        let (_, binding, list) = keygen_round_committed(&mut fed);
        let mut forge = seal_wrongly_for_p1(binding, list);
        let silent = ["p2", "p3", "p4"].iter().map(|p| (p.to_string(), DECRYPT)).collect();
        let mut script = Script { forge: Some(&mut forge), silent, ..Script::default() };
        let err = fed.drive(1, &mut script).unwrap_err();
        assert!(matches!(err, Error::BelowThreshold(_)), "{err}");
        let global = params(&[0.0; 2]);
        let rm = fed
            .server
            .begin_round(&RoundInfo { round: 2, parties: &fed.names.clone(), global: &global, fit: Some(&fit(2)) })
            .unwrap();
        let rc: wire::RoundConfig = Envelope::body(rm).decode("c", "rc").unwrap();
        assert!(rc.keygen && rc.parties == ["p1", "p2", "p3", "p4"], "{rc:?}");
        let rest: Vec<String> = fed.names[1..].to_vec();
        let a = fed.round(2, &rest, &global, &mut Script::default()).unwrap();
        assert_eq!(weighted(&a).2, &["p1", "p2", "p3", "p4"]);
    }

    /// A complainer that lies is named, and nobody is convicted: with a
    /// proof that does not check, or with a true proof about a share that
    /// opens (here the share p1 sees was altered and re-signed as p0's, a
    /// stand-in for a party that reveals its key and claims a good share is
    /// bad: the coordinator opens the share p0 actually dealt).
    #[test]
    fn a_false_complaint_names_the_complainer() {
        for bogus_proof in [true, false] {
            let mut fed = Fed::new(5, 3);
            let (_, binding, list) = keygen_round_committed(&mut fed);
            let mut tamper = move |stage: StageName, p: &str, m: &mut Envelope| {
                if !bogus_proof && stage == KEY_CONFIRM && p == "p1" {
                    let mut d: wire::KeyDelivery = unframe_message(m.clone(), "t", "t").unwrap();
                    let share = d.dealt.iter_mut().find(|x| x.dealer == "p0").unwrap().share.as_mut().unwrap();
                    share.ciphertext[0] ^= 1;
                    use crate::secagg::protocol::IdentitySigner;
                    share.signature = crate::secagg::testing::InsecureTagSigner("p0".into())
                        .sign(&sealed_share_transcript(&binding, &list, share))
                        .unwrap();
                    *m = framed_message(&d);
                }
            };
            let mut forge = move |stage: StageName, p: &str, m: &mut Envelope| {
                if bogus_proof && stage == KEY_CONFIRM && p == "p1" {
                    let mut u: wire::Upload = m.decode("t", "t").unwrap();
                    u.complaints.push(wire::KeyComplaint {
                        dealer: "p2".into(),
                        shared: dleq::DhSecret::generate(&mut OsRng).public().to_vec(),
                        proof: vec![1; 64],
                    });
                    // p1 itself lies: it signs the record over the complaint.
                    u.complaints_hash = complaints_hash(&binding, "p1", &u.complaints);
                    use crate::secagg::protocol::IdentitySigner;
                    u.signature = crate::secagg::testing::InsecureTagSigner("p1".into())
                        .sign(&upload_transcript(&binding, &u))
                        .unwrap();
                    m.body = prost::Message::encode_to_vec(&u);
                }
            };
            let mut script = Script {
                tamper: Some(&mut tamper),
                forge: Some(&mut forge),
                rejected: Some(Vec::new()),
                ..Script::default()
            };
            let a = fed.drive(1, &mut script).unwrap();
            let rejected = script.rejected.unwrap();
            let expected = if bogus_proof { "proof" } else { "which opens" };
            assert!(
                rejected.iter().any(|(p, e)| p == "p1" && e.contains("party p1 misbehaved") && e.contains(expected)),
                "{rejected:?}"
            );
            let (_, _, contributors, misbehaved) = weighted(&a);
            assert_eq!(contributors, &["p0", "p2", "p3", "p4"]);
            assert!(misbehaved.is_empty(), "{misbehaved:?}");
        }
    }

    /// The upload record signs its complaints: one dropped on the way (the
    /// dealer would go unconvicted) or added (an honest party would be
    /// named a false complainer) is caught, and the record is refused.
    #[test]
    fn complaints_dropped_or_added_in_transit_are_caught() {
        // Dropped or added on the way, directly or by the relay p1 dials
        // (which forwards an upload with complaints alone, as it came).
        for (drop_it, via_relay) in [(true, false), (false, false), (true, true), (false, true)] {
            let mut fed = Fed::new(5, 3);
            let (_, binding, list) = keygen_round_committed(&mut fed);
            let mut seal = seal_wrongly_for_p1(binding, list);
            let mut edit = move |m: &mut Envelope| {
                let mut u: wire::Upload = m.decode("t", "t").unwrap();
                if drop_it {
                    assert_eq!(u.complaints.len(), 1);
                    u.complaints.clear();
                } else {
                    assert!(u.complaints.is_empty());
                    u.complaints.push(wire::KeyComplaint {
                        dealer: "p2".into(),
                        shared: vec![0; 32],
                        proof: vec![0; 64],
                    });
                }
                m.body = prost::Message::encode_to_vec(&u);
            };
            let edit = std::cell::RefCell::new(&mut edit);
            let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
                if drop_it {
                    seal(stage, p, m);
                }
                if stage == KEY_CONFIRM && p == "p1" && !via_relay {
                    (edit.borrow_mut())(m);
                }
            };
            let mut relay_forge = |relay: &str, p: &str, m: &mut Envelope| {
                if via_relay && relay == "edge-a" && p == "p1" {
                    (edit.borrow_mut())(m);
                }
            };
            let mut script = Script {
                forge: Some(&mut forge),
                relay_forge: Some(&mut relay_forge),
                relays: if via_relay { vec![("edge-a", vec!["p1".into()])] } else { Vec::new() },
                rejected: Some(Vec::new()),
                ..Script::default()
            };
            let _ = fed.drive(1, &mut script);
            let rejected = script.rejected.unwrap();
            let want = if via_relay { " (or relay edge-a altered them)" } else { "signed upload record does not" };
            assert!(
                rejected.iter().any(|(p, e)| p == "p1"
                    && e.contains("party p1 misbehaved")
                    && e.contains("signed upload record does not")
                    && e.contains(want)),
                "drop {drop_it}, relay {via_relay}: {rejected:?}"
            );
        }
    }

    #[test]
    fn a_relay_forwards_an_upload_with_complaints_alone_and_the_dealer_is_convicted() {
        // p1 dials relay edge-a with p2; p0 seals p1 a share that does not
        // open. The relay cannot add p1's upload (it carries a complaint),
        // so it forwards it as it came; the coordinator checks the
        // complaint and convicts p0, as for a direct upload.
        let mut fed = Fed::new(5, 3);
        let (_, binding, list) = keygen_round_committed(&mut fed);
        let mut forge = seal_wrongly_for_p1(binding, list);
        let mut script = Script {
            forge: Some(&mut forge),
            relays: vec![("edge-a", vec!["p1".into(), "p2".into()])],
            rejected: Some(Vec::new()),
            ..Script::default()
        };
        let a = fed.drive(1, &mut script).unwrap();
        let (_, _, contributors, misbehaved) = weighted(&a);
        assert!(misbehaved.iter().any(|(p, e)| p == "p0" && e.contains("does not open")), "{misbehaved:?}");
        assert!(
            contributors.contains(&"p1".to_string()) && contributors.contains(&"p2".to_string()),
            "{contributors:?}"
        );
        assert!(script.rejected.unwrap().is_empty());
    }

    /// A revealed pairwise key reaches the coordinator only: the records
    /// relayed to decryptors carry no complaint.
    #[test]
    fn complaints_are_not_relayed_to_other_parties() {
        let mut fed = Fed::new(5, 3);
        let (_, binding, list) = keygen_round_committed(&mut fed);
        let mut forge = seal_wrongly_for_p1(binding, list);
        let mut checked = 0;
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == DECRYPT {
                let req: wire::DecryptRequest = m.decode("t", "t").unwrap();
                assert_eq!(req.uploads.len(), 5);
                assert!(req.uploads.iter().all(|u| u.complaints.is_empty()));
                checked += 1;
            }
        };
        let mut script = Script { forge: Some(&mut forge), tamper: Some(&mut tamper), ..Script::default() };
        fed.drive(1, &mut script).unwrap();
        drop(script);
        assert!(checked >= 4, "{checked} decryption requests checked");
    }

    /// A dealer whose sealed share does not carry its signature is refused
    /// by the coordinator before anything is relayed: it is left out of the
    /// key alone, and no other party refuses or blames the coordinator.
    #[test]
    fn a_dealer_whose_share_is_not_signed_is_dropped_alone() {
        let mut fed = Fed::new(5, 3);
        keygen_round_committed(&mut fed);
        let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == KEY_DEAL && p == "p0" {
                let mut d: wire::Deal = unframe_message(m.clone(), "t", "t").unwrap();
                d.shares[0].signature[0] ^= 1;
                *m = framed_message(&d);
            }
        };
        let mut script = Script { forge: Some(&mut forge), rejected: Some(Vec::new()), ..Script::default() };
        let a = fed.drive(1, &mut script).unwrap();
        // The coordinator names p0 alone, and only p0 itself objects (its
        // own dealing is not in the key).
        let rejected = script.rejected.unwrap();
        assert!(
            rejected.len() == 1
                && rejected[0].0 == "p0"
                && rejected[0].1.contains("party p0 misbehaved")
                && rejected[0].1.contains("does not carry its signature"),
            "{rejected:?}"
        );
        assert!(script.refusals.iter().all(|(_, p, _)| p == "p0"), "{:?}", script.refusals);
        assert_eq!(weighted(&a).2, &["p1", "p2", "p3", "p4"]);
    }

    #[test]
    fn commitment_lists_and_key_deliveries_that_do_not_check_are_refused_naming_the_coordinator() {
        // Edits to the commitment list (key-deal stage) and to the key
        // delivery (key-confirm stage) sent to each party; "{q}" in a
        // fragment stands for another party than the recipient.
        type ListEdit = Box<dyn Fn(&str, &mut wire::CommitList)>;
        let other = |p: &str| if p == "p0" { "p1".to_owned() } else { "p0".to_owned() };
        let lists: Vec<(&str, ListEdit)> = vec![
            (
                "not a party of the round",
                Box::new(|_, l| {
                    let mut c = l.commits[0].clone();
                    c.party = "zz-sybil".into();
                    l.commits.push(c);
                }),
            ),
            (
                "key commitment of {q} without its signature",
                Box::new(move |p, l| {
                    let c = l.commits.iter_mut().find(|c| c.party == other(p)).unwrap();
                    c.commitment[0] ^= 1;
                }),
            ),
            (
                "two key commitments of {q}",
                Box::new(move |p, l| {
                    let c = l.commits.iter().find(|c| c.party == other(p)).unwrap().clone();
                    l.commits.push(c);
                }),
            ),
            (
                "for this party that it did not make",
                Box::new(|p, l| {
                    let c = l.commits.iter_mut().find(|c| c.party == p).unwrap();
                    c.commitment[0] ^= 1;
                }),
            ),
        ];
        for (want, edit) in lists {
            let mut tamper = |stage: StageName, p: &str, m: &mut Envelope| {
                if stage == KEY_DEAL {
                    let mut l: wire::CommitList = m.decode("t", "t").unwrap();
                    edit(p, &mut l);
                    *m = Envelope::encode(&l);
                }
            };
            let r = refusals_under(5, &mut tamper);
            let deal: Vec<_> = r.iter().filter(|(s, _, _)| *s == KEY_DEAL).collect();
            assert_eq!(deal.len(), 5, "{want}: {r:?}");
            for (_, p, e) in deal {
                let want = want.replace("{q}", &other(p));
                assert!(e.contains("party coordinator misbehaved") && e.contains(&want), "{want}: {p}: {e}");
            }
        }
        // A key delivery without the party's own dealing: the key would then
        // hold no secret this party knows to be honest.
        let mut tamper = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == KEY_CONFIRM {
                let mut d: wire::KeyDelivery = unframe_message(m.clone(), "t", "t").unwrap();
                d.dealt.retain(|d| d.dealer != p);
                *m = framed_message(&d);
            }
        };
        let r = refusals_under(5, &mut tamper);
        let confirm: Vec<_> = r.iter().filter(|(s, _, _)| *s == KEY_CONFIRM).collect();
        assert_eq!(confirm.len(), 5, "{r:?}");
        assert!(
            confirm.iter().all(|(_, _, e)| e.contains("party coordinator misbehaved")
                && e.contains("left this party's own dealing out of the key")),
            "{confirm:?}"
        );
    }

    #[test]
    fn a_second_hash_over_contributors_that_are_not_a_strict_subset_is_refused() {
        // The coordinator may ask again at the hash stage only over fewer
        // contributors (after leaving out a relay group): asked again over
        // the same set, each party refuses. The parties stop answering at
        // decryption, so they all sit in their hashed state.
        let (mut fed, names, global) = keyed_fed(5, 2);
        let requests: std::cell::RefCell<Vec<(String, Envelope)>> = Default::default();
        let mut capture = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == HASH {
                requests.borrow_mut().push((p.to_owned(), m.clone()));
            }
        };
        let silent = names.iter().map(|p| (p.clone(), DECRYPT)).collect();
        let mut script = Script { tamper: Some(&mut capture), silent, ..Script::default() };
        assert!(fed.round(2, &names, &global, &mut script).is_err(), "nobody decrypted");
        assert!(script.refusals.is_empty(), "{:?}", script.refusals);
        let requests = requests.into_inner();
        assert_eq!(requests.len(), 5);
        for (p, m) in requests {
            let err = fed.clients.get_mut(&p).unwrap().on_step(2, HASH, m).map(|_| ()).unwrap_err().to_string();
            assert!(
                err.contains("party coordinator misbehaved") && err.contains("not a subset of the first's"),
                "{p}: {err}"
            );
        }
    }

    #[test]
    fn a_key_without_the_party_or_with_too_few_dealers_is_refused() {
        let mut tamper = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == KEY_DEAL && p == "p0" {
                let mut l: wire::CommitList = m.decode("t", "t").unwrap();
                l.commits.retain(|c| c.party != "p0");
                *m = Envelope::encode(&l);
            }
            if stage == KEY_CONFIRM && p == "p1" {
                let mut d: wire::KeyDelivery = unframe_message(m.clone(), "t", "t").unwrap();
                d.dealt.truncate(2);
                *m = framed_message(&d);
            }
        };
        let r = refusals_under(5, &mut tamper);
        assert!(
            r.iter().any(|(s, p, e)| *s == KEY_DEAL && p == "p0" && e.contains("left this party's key commitment out")),
            "{r:?}"
        );
        assert!(r.iter().any(|(s, p, e)| *s == KEY_CONFIRM && p == "p1" && e.contains("coordinator")), "{r:?}");
    }

    #[test]
    fn round_parameters_the_spec_does_not_give_are_refused() {
        let mut fed = Fed::new(4, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 2]);
        let fit1 = fit(1);
        let rm = fed
            .server
            .begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit1) })
            .unwrap();
        let edits: Vec<Edit> = vec![
            ("bits", Box::new(|c| c.bits = 16)),
            ("clip", Box::new(|c| c.clip = 9.0)),
            ("at least 3", Box::new(|c| c.parties.truncate(2))),
            ("does not name", Box::new(|c| c.parties.push("zz".into()))),
            ("not sorted and unique", Box::new(|c| c.parties.reverse())),
            ("not sorted and unique", Box::new(|c| c.parties[1] = c.parties[0].clone())),
            ("a round without this party", Box::new(|c| c.parties.retain(|p| p != "p0"))),
            ("max_examples", Box::new(|c| c.max_examples += 1)),
            ("dp", Box::new(|c| c.dp_digest = vec![1; 32])),
            ("values; this party sums", Box::new(|c| c.dim += 1)),
            ("key epoch in a keygen round", Box::new(|c| c.epoch = vec![1; 32])),
            (
                "holds no share",
                Box::new(|c| {
                    c.keygen = false;
                    c.epoch = vec![1; 32];
                }),
            ),
        ];
        for (want, edit) in edits {
            let mut rc: wire::RoundConfig = prost::Message::decode(rm.as_slice()).unwrap();
            edit(&mut rc);
            let u = LocalUpdate {
                global: &global,
                fit: &fit1,
                local: params(&[0.1, 0.1]),
                num_examples: 5,
                train_loss: None,
            };
            let err = fed
                .clients
                .get_mut("p0")
                .unwrap()
                .contribute(1, &prost::Message::encode_to_vec(&rc), u)
                .unwrap_err()
                .to_string();
            assert!(err.contains("party coordinator misbehaved") && err.contains(want), "{want}: {err}");
        }
    }

    /// Distributed DP for `job` (unit clip, noise multiplier 0.5, 3 honest
    /// parties, the protocol's bits).
    fn ddg_template(job: &JobFacts) -> confide_dp::ddg::DdgConfig {
        confide_dp::ddg::DdgConfig {
            clip: 1.0,
            noise_multiplier: 0.5,
            dim: confide_dp::ddg::MAX_PADDED_DIM,
            bits: settings_for(&toml::Table::new(), job).unwrap().b(),
            max_parties: job.party_names.len(),
            honest_parties: 3,
            beta: (-0.5f64).exp(),
            k_stddevs: 4.0,
        }
    }

    /// Party-level DP with distributed noise under he: the decrypted sum is
    /// Σ clip(Δᵢ) plus the parties' noise, with the calibrated variance,
    /// with every party contributing and with one that never does (three
    /// contributors, the job's minimum and its honest count, as γ = 0.05
    /// of four is none): the sum then carries (z·c)² at least, where noise
    /// calibrated for all four parties would leave it 3/4 of that.
    #[test]
    fn distributed_dp_noise_is_carried_through_encryption() {
        for contributors in [4, 3] {
            noise_through_encryption(contributors);
        }
    }

    fn noise_through_encryption(contributors: usize) {
        let n = 4;
        let job = JobFacts::new("job", names(n), 100, 3, 1 << 20);
        let bits = settings_for(&toml::Table::new(), &job).unwrap().b();
        let carrier = ThresholdHe.noise_carrier(&toml::Table::new(), &job).unwrap();
        assert_eq!(carrier.bits, bits);
        let template = ddg_template(&job);
        let job = JobFacts { distributed_dp: Some(template), ..job };
        let names = names(n);
        let mut server = ThresholdHe.server(&toml::Table::new(), &job, Box::new(InsecureTagVerifier)).unwrap();
        let mut clients: BTreeMap<String, Box<dyn AggregationClient>> = names
            .iter()
            .map(|p| (p.clone(), ThresholdHe.client(&toml::Table::new(), &job, identity(p)).unwrap()))
            .collect();
        let global = params(&vec![0.0; 2000]);
        let fit1 = fit(1);
        let rm =
            server.begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit1) }).unwrap();
        for p in &names[..contributors] {
            // Updates far beyond the clip: each is cut to norm 1.
            let local = params(&vec![100.0; 2000]);
            let u = LocalUpdate { global: &global, fit: &fit1, local, num_examples: 1, train_loss: None };
            let m = clients.get_mut(p).unwrap().contribute(1, &rm, u).unwrap();
            server.on_message(Peer { name: p, certificate: &[], relay: None }, m).unwrap();
        }
        let mut fed = Fed { names: names.clone(), server, clients, round_message: Vec::new() };
        let a = fed.drive(1, &mut Script::default()).unwrap();
        let (sum, total, _, _) = weighted(&a);
        let k = contributors as f64;
        assert_eq!(total, k);
        let mechanism = NoisyUpdate::new(&template, "job", 1, &global).unwrap();
        let clipped = k / 2000f64.sqrt();
        let mean = sum.iter().sum::<f64>() / sum.len() as f64;
        let var = sum.iter().map(|v| (v - clipped).powi(2)).sum::<f64>() / sum.len() as f64;
        let want = k * (f64::from(mechanism.mechanism().local_sigma()) / mechanism.mechanism().scale()).powi(2);
        assert!((mean - clipped).abs() < 0.1 * want.sqrt() + 0.01, "{k}: mean {mean} vs {clipped}");
        assert!((var / want - 1.0).abs() < 0.15, "{k}: variance {var} vs {want}");
        // At least (z·c)² = 0.25 whoever contributed (2,000 values: the
        // sample variance's relative s.d. is 3.2%, so 0.85 is 4.7 of them).
        assert!(var >= 0.25 * 0.85, "{k} contributors: variance {var} below (z·c)²");
    }

    #[test]
    fn a_contributor_that_signs_a_wrong_hash_is_flagged_and_still_counted() {
        let mut fed = Fed::new(5, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 2]);
        let mut forge = |stage: StageName, p: &str, m: &mut Envelope| {
            if stage == HASH && p == "p1" {
                let mut hv: wire::HashValue = m.decode("t", "t").unwrap();
                let req_binding_and_rest = hv.values[0];
                hv.values[0] = (req_binding_and_rest + 1) % he::ring::Q;
                // Re-signed by p1 itself: a lying party, not a forgery.
                LYING.with(|l| {
                    let (binding, commitment, contributors) = l.borrow().clone().unwrap();
                    let t = hash_transcript(&binding, "p1", &commitment, &contributors, &hv.values, &hv.c0_values);
                    use crate::secagg::protocol::IdentitySigner;
                    hv.signature = crate::secagg::testing::InsecureTagSigner("p1".into()).sign(&t).unwrap();
                });
                *m = Envelope::encode(&hv);
            }
        };
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == HASH {
                let req: wire::HashRequest = m.decode("t", "t").unwrap();
                let commitment: [u8; 32] = req.commitment.as_slice().try_into().unwrap();
                LYING.with(|l| {
                    let binding = l.borrow().as_ref().map(|x| x.0);
                    *l.borrow_mut() = binding.map(|b| (b, commitment, req.contributors.clone()));
                });
            }
        };
        // The round's binding, as the parties derive it.
        let fit1 = fit(1);
        let rm = fed
            .server
            .begin_round(&RoundInfo { round: 1, parties: &names, global: &global, fit: Some(&fit1) })
            .unwrap();
        let derived = {
            let HeClientView(c) = HeClientView::of(&fed, &rm, &global, &fit1);
            c
        };
        LYING.with(|l| *l.borrow_mut() = Some((derived, [0; 32], Vec::new())));
        for p in &names {
            let i: usize = p[1..].parse().unwrap();
            let u = LocalUpdate {
                global: &global,
                fit: &fit1,
                local: params(&[0.01 * (i as f32 + 1.0); 2]),
                num_examples: 10 * (i as u64 + 1),
                train_loss: None,
            };
            let m = fed.clients.get_mut(p).unwrap().contribute(1, &rm, u).unwrap();
            fed.server.on_message(Peer { name: p, certificate: &[], relay: None }, m).unwrap();
        }
        let mut script = Script { forge: Some(&mut forge), tamper: Some(&mut tamper), ..Script::default() };
        let a = fed.drive(1, &mut script).unwrap();
        let (sum, total, contributors, misbehaved) = weighted(&a);
        assert!(script.refusals.is_empty(), "{:?}", script.refusals);
        assert_eq!((total, contributors.len()), (expected(&[0, 1, 2, 3, 4]).1, 5));
        assert!((sum[0] - expected(&[0, 1, 2, 3, 4]).0).abs() < 0.05);
        assert!(misbehaved.iter().any(|(p, why)| p == "p1" && why.contains("linear hash")), "{misbehaved:?}");
    }

    thread_local! {
        static LYING: std::cell::RefCell<Seen> = const { std::cell::RefCell::new(None) };
    }

    /// The binding a party derives for a round message.
    struct HeClientView([u8; 32]);

    impl HeClientView {
        fn of(fed: &Fed, rm: &[u8], global: &Parameters, fit: &FitConfig) -> HeClientView {
            HeClientView::of_round(fed, rm, global, fit, 1)
        }

        fn of_round(fed: &Fed, rm: &[u8], global: &Parameters, fit: &FitConfig, round: u32) -> HeClientView {
            let rc: wire::RoundConfig = prost::Message::decode(rm).unwrap();
            let job = JobFacts::new("job", fed.names.clone(), 100, 3, 1 << 20);
            let s = settings_for(&table(), &job).unwrap();
            let epoch = (!rc.keygen).then(|| rc.epoch.as_slice().try_into().unwrap());
            let d = derive_round(
                "job",
                round,
                &rc.parties,
                rc.keygen,
                epoch,
                WeightedUpdate::words(global.num_values()),
                &s,
                crate::aggregation::training_digest(global, fit),
                0,
                None,
            );
            HeClientView(d.binding)
        }
    }

    /// A stated fraction of the named parties counts as secagg counts it:
    /// 0.29 × 100 is 28.999999999999996 in f64, and flooring that would
    /// calibrate the distributed noise for one honest party too many (and
    /// lower the threshold by one).
    #[test]
    fn the_corrupt_count_is_the_stated_fraction_of_the_parties() {
        let s = HeSettings { corrupt_fraction: 0.29, ..HeSettings::default() };
        assert_eq!(s.corrupt_parties(100), 29);
        let tm = crate::secagg::params::ThreatModel { corrupt_fraction: 0.29, dropout_fraction: 0.0 };
        assert_eq!(s.corrupt_parties(100), crate::secagg::params::corrupt_parties(100, &tm));
        for (fraction, n, want) in [(0.05, 100, 5), (0.1, 20, 2), (0.3, 10, 3), (0.2, 4, 0)] {
            let s = HeSettings { corrupt_fraction: fraction, ..HeSettings::default() };
            assert_eq!(s.corrupt_parties(n), want, "{fraction} × {n}");
        }
    }

    /// A coordinator that gathers a small key (its corrupt parties and few
    /// honest ones) would lower τ to the coalition's size: parties derive
    /// the corrupt bound from the job, not the key, and refuse small keys.
    #[test]
    fn a_key_too_small_for_the_jobs_corrupt_parties_is_refused() {
        // 20 parties, γ = 0.1: up to 2 corrupt, so keys of at least 5.
        assert_eq!(HeSettings::min_key_parties(2), 5);
        let mut fed = Fed::new(20, 3);
        let names = fed.names.clone();
        let global = params(&[0.0; 2]);
        let mut tamper = |stage: StageName, _: &str, m: &mut Envelope| {
            if stage == KEY_DEAL {
                let mut l: wire::CommitList = m.decode("t", "t").unwrap();
                l.commits.truncate(4);
                *m = Envelope::encode(&l);
            }
        };
        let mut script = Script { tamper: Some(&mut tamper), ..Script::default() };
        assert!(fed.round(1, &names[..6], &global, &mut script).is_err());
        let refusals: Vec<_> = script.refusals.iter().filter(|(s, _, _)| *s == KEY_DEAL).collect();
        assert!(!refusals.is_empty(), "{:?}", script.refusals);
        // Those in the small key refuse its size; the others, being left out.
        for (_, p, e) in &refusals {
            let want =
                if ["p0", "p1", "p2", "p3"].contains(&p.as_str()) { "keys of at least 5" } else { "left this party's" };
            assert!(e.contains(want), "{p}: {e}");
        }
        // And the coordinator's own side does not start such a key.
        let err = fed.round(2, &names[..4], &global, &mut Script::default()).unwrap_err();
        assert!(err.to_string().contains("a key needs at least 5"), "{err}");
    }

    #[test]
    fn settings_are_validated_by_field() {
        let job = JobFacts::new("j", names(10), 100, 3, 1000);
        let bad = |t: toml::Table| ThresholdHe.validate(&t, &job).into_iter().map(|p| p.field).collect::<Vec<_>>();
        assert!(bad(toml::Table::new()).is_empty(), "{:?}", ThresholdHe.validate(&toml::Table::new(), &job));
        assert_eq!(bad(toml::toml! { corrupt_fraction = 0.5 }), ["corrupt_fraction"]);
        // Huge, and the bits left to derive: refused by field at once (a
        // search over key sizes used to run before the check; found by review).
        for huge in [1e15, 1e300, f64::INFINITY] {
            let t: toml::Table = [("corrupt_fraction".to_string(), toml::Value::Float(huge))].into_iter().collect();
            assert_eq!(bad(t), ["corrupt_fraction"], "{huge}");
        }
        assert_eq!(HeSettings::min_key_parties(usize::MAX), usize::MAX);
        assert_eq!((HeSettings::min_key_parties(0), HeSettings::min_key_parties(4)), (3, 7));
        assert_eq!(bad(toml::toml! { bits = 40 }), ["bits"]);
        let b = bad(toml::toml! { bits = 32 });
        assert!(!b.is_empty() && b.iter().all(|f| f == "bits"), "32 bits leave no room for the noise: {b:?}");
        // Unset, the bits follow from the largest key: 21 for 10 parties.
        let resolved = settings_for(&toml::Table::new(), &job).unwrap();
        assert_eq!(resolved.bits, Some(21));
        let fifty = JobFacts::new("j", names(50), 100, 3, 1000);
        // Fifty parties leave 10 bits: too few for 50 × max_examples, said by field.
        assert_eq!(HeSettings::default().plaintext_bits(&fifty), 10);
        assert!(ThresholdHe.validate(&toml::Table::new(), &fifty).iter().any(|p| p.field == "max_examples"));
        assert_eq!(bad(toml::toml! { key_budget_log2 = 50 }), ["key_budget_log2"]);
        assert_eq!(bad(toml::toml! { nope = 1 }), ["nope"]);
        let two = JobFacts::new("j", names(2), 100, 2, 1000);
        assert!(ThresholdHe.validate(&toml::Table::new(), &two).iter().any(|p| p.field == "parties.min" && p.absolute));
        assert!(ThresholdHe.explain(&toml::Table::new(), &job).iter().any(|l| l.contains("with 10 parties")));
    }
}
