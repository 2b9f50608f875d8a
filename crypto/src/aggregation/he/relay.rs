//! The relay's side of `he` (sans-IO): a relay (`confide relay`) sums the
//! ciphertexts of the parties that dial it and forwards one.
//!
//! The relay holds no key material and is trusted with nothing: it sees
//! only ciphertexts and signed records. Each member's signed upload record
//! travels on; the group's sum travels once, on the record of one member
//! (the leader); the other members' records arrive without a ciphertext.
//! The coordinator cannot check a group sum against the members' signed
//! hashes of their bytes, so it checks it against their signed linear
//! hashes instead: a group whose sum is not its members' (a lying relay, or
//! a member that signed a wrong hash) or that lost a member before it
//! hashed is left out of the round as a whole, and the remaining parties
//! hash again (see `HeServer`).

use super::wire;
use super::{Bulk, Envelope, Error, c0_hash, c1_hash, from_words, misbehaved, to_words};
use crate::he;

/// Width of one coefficient of a group's c0 sum: the switched width plus
/// the bits the count adds.
pub(super) fn group_c0_bits(switch_bits: u32, count: usize) -> u32 {
    switch_bits + (usize::BITS - count.leading_zeros())
}

/// Bytes of a group sum of `count` ciphertexts of `slots` coefficients.
pub(super) fn group_bytes(slots: usize, switch_bits: u32, count: usize) -> usize {
    he::pack::packed_len(slots, group_c0_bits(switch_bits, count)) + he::pack::packed_len(slots, 62)
}

/// The round's coefficient count, as the round message states it.
fn slots_of(round_message: &[u8]) -> Result<usize, Error> {
    let rc: wire::RoundConfig = Envelope::body(round_message.to_vec()).decode("coordinator", "round config")?;
    let dim = usize::try_from(rc.dim).map_err(|_| misbehaved("coordinator", "an absurd round size"))?;
    if dim > (1 << 32) {
        return Err(misbehaved("coordinator", format!("a round of {dim} values")));
    }
    Ok(dim.max(1).div_ceil(he::ring::N) * he::ring::N)
}

/// Whether `upload` (a member's contribution) claims a relay group's
/// fields (`relay`, `group`, `group_bytes`): that is never a party's own
/// upload, and forwarded as it came on the party's relayed stream, the
/// coordinator would take it for the relay's group and blame the relay, the
/// party never dropped (found by review). An upload that does not decode
/// is not such a claim (the coordinator judges it as the party's).
pub fn claims_a_group(upload: &Envelope) -> bool {
    upload
        .decode::<wire::Upload>("party", "upload record")
        .is_ok_and(|r| !r.relay.is_empty() || !r.group.is_empty() || r.group_bytes != 0)
}

/// The uploads of one round that a relay's members send, summed as they come.
pub struct UploadGroup {
    relay: String,
    slots: usize,
    switch_bits: Option<u32>,
    records: Vec<wire::Upload>,
    /// The first member's message, forwarded unchanged if it stays alone.
    first: Option<Envelope>,
    c0: Vec<u64>,
    c1: Vec<u64>,
}

impl UploadGroup {
    /// A group for the round that `round_message` (the fit or secure-sum
    /// task's round message) starts.
    pub fn new(relay: &str, round_message: &[u8]) -> Result<UploadGroup, Error> {
        let slots = slots_of(round_message)?;
        Ok(UploadGroup {
            relay: relay.to_owned(),
            slots,
            switch_bits: None,
            records: Vec::new(),
            first: None,
            c0: Vec::new(),
            c1: Vec::new(),
        })
    }

    /// Members summed so far.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no member has uploaded.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Adds `party`'s upload (the contribution of its fit or secure-sum
    /// result) and the certificate it showed the relay. An upload that is
    /// not one (wrong size, a record for someone else) is refused naming
    /// the party; the caller forwards it unchanged, for the coordinator to
    /// judge.
    pub fn add(&mut self, party: &str, certificate: &[u8], upload: Envelope) -> Result<(), Error> {
        let mut record: wire::Upload = upload.decode(party, "upload record")?;
        if record.party != party || !record.relay.is_empty() || !record.group.is_empty() {
            return Err(misbehaved(party, "an upload record that is not its own plain upload"));
        }
        if !record.complaints.is_empty() {
            // Only the coordinator can check a complaint (it holds the
            // signed commitments and shares): forwarded alone, unchanged.
            return Err(misbehaved(party, "an upload with key complaints, for the coordinator to judge"));
        }
        if self.records.iter().any(|r| r.party == party) {
            return Err(misbehaved(party, "uploaded twice"));
        }
        let Some(Bulk::Words(words)) = &upload.bulk else {
            return Err(misbehaved(party, "an upload without its ciphertext"));
        };
        let bytes = from_words(words, record.bytes, party, "ciphertext")?;
        let c1_len = he::pack::packed_len(self.slots, 62);
        let c0_len = bytes.len().checked_sub(c1_len).ok_or_else(|| misbehaved(party, "a ciphertext too short"))?;
        let bits = (c0_len * 8 / self.slots) as u32;
        if !(1..=62).contains(&bits) || he::pack::packed_len(self.slots, bits) != c0_len {
            return Err(misbehaved(party, format!("a ciphertext of {} bytes for {} slots", bytes.len(), self.slots)));
        }
        if self.switch_bits.is_some_and(|b| b != bits) {
            return Err(misbehaved(party, "a ciphertext of another width than the group's"));
        }
        let c0 =
            he::pack::unpack(&bytes[..c0_len], self.slots, bits, "c0").map_err(|e| misbehaved(party, e.to_string()))?;
        let c1 =
            he::pack::unpack(&bytes[c0_len..], self.slots, 62, "c1").map_err(|e| misbehaved(party, e.to_string()))?;
        if c1.iter().any(|&c| c >= he::ring::Q) {
            return Err(misbehaved(party, "c1: a coefficient not below q"));
        }
        // What the coordinator checks of a direct upload, and can no longer
        // check of a summed one: the bytes are the ones the party signed.
        if c0_hash(&c0).as_slice() != record.c0_hash || c1_hash(&c1).as_slice() != record.c1_hash {
            return Err(misbehaved(party, "its ciphertext does not match its signed upload record"));
        }
        if group_c0_bits(bits, self.records.len() + 1) > 64 {
            return Err(Error::InvalidInput(format!("relay {}: too many members for one group sum", self.relay)));
        }
        if self.records.is_empty() {
            self.c0 = c0;
            self.c1 = c1;
            self.first = Some(upload);
        } else {
            for (a, b) in self.c0.iter_mut().zip(&c0) {
                *a += b;
            }
            he::ring::add_assign(&mut self.c1, &c1);
            self.first = None;
        }
        self.switch_bits = Some(bits);
        record.certificate = certificate.to_vec();
        self.records.push(record);
        Ok(())
    }

    /// The messages to forward, one per member in the order they came: the
    /// last carries the group's records and its sum; the others only their
    /// own record. A group of one is forwarded as it came.
    pub fn finish(self) -> Vec<(String, Envelope)> {
        self.finish_led_by(None)
    }

    /// [`Self::finish`] with the sum on `leader`'s message (when it is a
    /// member): the relay picks a member whose stream is still open.
    pub fn finish_led_by(mut self, leader: Option<&str>) -> Vec<(String, Envelope)> {
        if let Some(i) = leader.and_then(|l| self.records.iter().position(|r| r.party == l)) {
            let r = self.records.remove(i);
            self.records.push(r);
        }
        if self.records.len() <= 1 {
            return match (self.records.pop(), self.first) {
                (Some(r), Some(e)) => vec![(r.party, e)],
                _ => Vec::new(),
            };
        }
        let count = self.records.len();
        let bits = self.switch_bits.unwrap_or(62);
        let mut payload = Vec::with_capacity(group_bytes(self.slots, bits, count));
        he::pack::pack(&self.c0, group_c0_bits(bits, count), &mut payload);
        he::pack::pack(&self.c1, 62, &mut payload);
        let mut leader = self.records.pop().map(|mut r| {
            r.relay = self.relay.clone();
            r
        });
        let mut out: Vec<(String, Envelope)> = Vec::with_capacity(count);
        for mut r in self.records {
            r.relay = self.relay.clone();
            if let Some(l) = leader.as_mut() {
                l.group.push(r.clone());
            }
            // The coordinator checks members' certificates (from the
            // leader's group records) against the CA; a member's own record
            // travels bare.
            r.certificate.clear();
            out.push((r.party.clone(), Envelope::encode(&r)));
        }
        if let Some(mut l) = leader {
            l.group_bytes = payload.len() as u64;
            l.certificate.clear();
            out.push((
                l.party.clone(),
                Envelope { body: prost::Message::encode_to_vec(&l), bulk: Some(Bulk::Words(to_words(&payload))) },
            ));
        }
        out
    }
}
