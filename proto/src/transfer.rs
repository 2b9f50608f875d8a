//! Chunked transfer of bulk vectors (models, masked vectors).
//!
//! A sender puts a [`pb::BulkHeader`] in its task or result and then sends
//! [`pb::Chunk`]s of at most `chunk_bytes`, in order. A receiver starts an
//! [`Incoming`] from the header, which checks the declared sizes against
//! [`Limits`] *before* allocating, and then accepts only in-order chunks
//! that fit what was declared, writing them straight into the vector it
//! will hand over.

use std::sync::Arc;

use bytes::Bytes;
use confide_algorithms::{Parameters, Tensor, TensorSpec};
pub use confide_crypto::aggregation::Bulk;

use crate::{Error, Limits, pb};

/// A bulk vector's little-endian bytes, ready to be chunked for any number
/// of recipients without further copies.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The header to put in the message.
    pub header: pb::BulkHeader,
    /// The bytes the chunks slice.
    pub bytes: Bytes,
}

/// Owns a vector and shows it as bytes, so a party's masked vector or a
/// single-tensor model is sent without being copied.
struct LeBytes<T>(T);

impl AsRef<[u8]> for LeBytes<Vec<u32>> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl AsRef<[u8]> for LeBytes<Arc<Parameters>> {
    fn as_ref(&self) -> &[u8] {
        self.0.tensors().first().map(|t| bytemuck::cast_slice(t.data.as_slice())).unwrap_or_default()
    }
}

fn specs(tensors: impl Iterator<Item = (String, Vec<usize>)>) -> Vec<pb::TensorSpec> {
    tensors.map(|(name, shape)| pb::TensorSpec { name, shape: shape.iter().map(|&d| d as u64).collect() }).collect()
}

/// Encodes `bulk` under `transfer_id`.
pub fn encode(transfer_id: u64, bulk: &Bulk) -> Encoded {
    let little = cfg!(target_endian = "little");
    match bulk {
        Bulk::Params(p) => {
            let tensors = specs(p.tensors().iter().map(|t| (t.name.clone(), t.shape.clone())));
            let bytes = if little && p.tensors().len() == 1 {
                Bytes::from_owner(LeBytes(p.clone()))
            } else {
                let mut b = Vec::with_capacity(p.num_values() * 4);
                for v in p.flat_values() {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                Bytes::from(b)
            };
            let header = pb::BulkHeader {
                transfer_id,
                kind: pb::BulkKind::F32Tensors as i32,
                tensors,
                total_bytes: bytes.len() as u64,
            };
            Encoded { header, bytes }
        }
        Bulk::Words(w) => {
            let bytes = if little {
                Bytes::from_owner(LeBytes(w.clone()))
            } else {
                Bytes::from(w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
            };
            Encoded { header: words_header(transfer_id, w.len()), bytes }
        }
    }
}

/// Encodes a vector of words, taking ownership so that no copy is made.
pub fn encode_words(transfer_id: u64, words: Vec<u32>) -> Encoded {
    let header = words_header(transfer_id, words.len());
    let bytes = if cfg!(target_endian = "little") {
        Bytes::from_owner(LeBytes(words))
    } else {
        Bytes::from(words.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    };
    Encoded { header, bytes }
}

fn words_header(transfer_id: u64, len: usize) -> pb::BulkHeader {
    pb::BulkHeader {
        transfer_id,
        kind: pb::BulkKind::U32Words as i32,
        tensors: vec![pb::TensorSpec { name: "words".into(), shape: vec![len as u64] }],
        total_bytes: len as u64 * 4,
    }
}

/// Splits encoded bytes into chunks of at most `chunk_bytes`; each chunk is
/// a slice of the shared buffer.
pub fn chunks(transfer_id: u64, bytes: &Bytes, chunk_bytes: usize) -> impl Iterator<Item = pb::Chunk> + '_ {
    let step = chunk_bytes.max(4);
    (0..bytes.len()).step_by(step).map(move |start| {
        let end = (start + step).min(bytes.len());
        pb::Chunk { transfer_id, offset: start as u64, data: bytes.slice(start..end) }
    })
}

#[derive(Debug)]
enum Buf {
    F32(Vec<f32>),
    U32(Vec<u32>),
    /// Chunks checked and counted, not kept (see [`Incoming::start_discarding`]).
    Discard,
}

impl Buf {
    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::F32(v) => bytemuck::cast_slice_mut(v.as_mut_slice()),
            Buf::U32(v) => bytemuck::cast_slice_mut(v.as_mut_slice()),
            Buf::Discard => &mut [],
        }
    }
}

/// A transfer being received.
#[derive(Debug)]
pub struct Incoming {
    transfer_id: u64,
    specs: Vec<TensorSpec>,
    expected: usize,
    received: usize,
    buf: Buf,
    /// Largest chunk accepted: what fits in one message, not this end's own
    /// `chunk_bytes`, so two ends configured with different chunk sizes
    /// still interoperate.
    max_chunk: usize,
}

impl Incoming {
    /// Checks a header against `limits` and prepares to receive its chunks.
    pub fn start(header: &pb::BulkHeader, limits: &Limits) -> Result<Incoming, Error> {
        Incoming::open(header, limits, true)
    }

    fn open(header: &pb::BulkHeader, limits: &Limits, keep: bool) -> Result<Incoming, Error> {
        let kind = pb::BulkKind::try_from(header.kind).unwrap_or(pb::BulkKind::Unspecified);
        if kind == pb::BulkKind::Unspecified {
            return Err(Error::ProtocolViolation(format!("bulk kind {} is not known", header.kind)));
        }
        if header.tensors.len() > limits.max_tensors {
            return Err(Error::LimitExceeded(format!(
                "{} tensors announced; limit is {}",
                header.tensors.len(),
                limits.max_tensors
            )));
        }
        if kind == pb::BulkKind::U32Words && header.tensors.len() != 1 {
            return Err(Error::ProtocolViolation(format!(
                "bulk.tensors: a word transfer is one vector; {} announced",
                header.tensors.len()
            )));
        }
        let mut specs = Vec::with_capacity(header.tensors.len());
        let mut names = std::collections::BTreeSet::new();
        let mut values = 0usize;
        for (i, t) in header.tensors.iter().enumerate() {
            if t.name.is_empty() || t.name.len() > 256 {
                return Err(Error::ProtocolViolation(format!("bulk.tensors[{i}].name must be 1 to 256 bytes")));
            }
            // Refused here, before any byte arrives, not once all have.
            if !names.insert(t.name.as_str()) {
                return Err(Error::ProtocolViolation(format!(
                    "bulk.tensors[{i}].name {:?} is announced twice",
                    t.name
                )));
            }
            let shape: Vec<usize> = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d).ok().filter(|&d| d <= limits.max_values + 1))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    Error::LimitExceeded(format!("bulk.tensors[{i}].shape ({}): a dimension above the limit", t.name))
                })?;
            let spec = TensorSpec { name: t.name.clone(), shape };
            let n = spec.num_values().ok_or_else(|| {
                Error::LimitExceeded(format!("bulk.tensors[{i}].shape ({}): the shape overflows", t.name))
            })?;
            // A masked vector holds the model's values and a weight word.
            let cap = limits.max_values + usize::from(kind == pb::BulkKind::U32Words);
            values = values.checked_add(n).filter(|&v| v <= cap).ok_or_else(|| {
                Error::LimitExceeded(format!("more than {} parameter values announced", limits.max_values))
            })?;
            specs.push(spec);
        }
        if header.total_bytes != (values as u64) * 4 {
            return Err(Error::ProtocolViolation(format!(
                "bulk.total_bytes {} does not match the {values} values the shapes imply",
                header.total_bytes
            )));
        }
        let buf = match kind {
            _ if !keep => Buf::Discard,
            pb::BulkKind::U32Words => Buf::U32(vec![0; values]),
            _ => Buf::F32(vec![0.0; values]),
        };
        Ok(Incoming {
            transfer_id: header.transfer_id,
            specs,
            expected: values * 4,
            received: 0,
            buf,
            max_chunk: limits.max_message_bytes.saturating_sub(1024).max(4),
        })
    }

    /// Checks a header and its chunks as [`Incoming::start`] does but keeps
    /// none of their bytes: for a transfer nobody will take (a result for a
    /// job that is not running, or does not name the sender), so that the
    /// announced size is never allocated for it; [`Incoming::finish`] then
    /// fails.
    pub fn start_discarding(header: &pb::BulkHeader, limits: &Limits) -> Result<Incoming, Error> {
        Incoming::open(header, limits, false)
    }

    /// Whether this transfer's bytes are being dropped as they come.
    pub fn is_discarding(&self) -> bool {
        matches!(self.buf, Buf::Discard)
    }

    /// The transfer this belongs to.
    pub fn transfer_id(&self) -> u64 {
        self.transfer_id
    }

    /// Whether every declared byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.received == self.expected
    }

    /// Appends one chunk; it must continue exactly where the last one ended.
    pub fn push(&mut self, chunk: &pb::Chunk) -> Result<(), Error> {
        if chunk.transfer_id != self.transfer_id {
            return Err(Error::ProtocolViolation(format!(
                "chunk of transfer {} while transfer {} is open",
                chunk.transfer_id, self.transfer_id
            )));
        }
        if chunk.offset != self.received as u64 {
            return Err(Error::ProtocolViolation(format!(
                "transfer {}: chunk at offset {} where {} was expected",
                self.transfer_id, chunk.offset, self.received
            )));
        }
        if chunk.data.is_empty() || chunk.data.len() > self.max_chunk {
            return Err(Error::LimitExceeded(format!(
                "transfer {}: chunk of {} bytes; chunks must hold 1 to {} bytes",
                self.transfer_id,
                chunk.data.len(),
                self.max_chunk
            )));
        }
        let end = self.received + chunk.data.len();
        if end > self.expected {
            return Err(Error::ProtocolViolation(format!(
                "transfer {}: chunks exceed the {} bytes announced",
                self.transfer_id, self.expected
            )));
        }
        if !self.is_discarding() {
            self.buf.bytes_mut()[self.received..end].copy_from_slice(&chunk.data);
        }
        self.received = end;
        Ok(())
    }

    /// The received vector; fails if bytes are missing.
    pub fn finish(self) -> Result<Bulk, Error> {
        if !self.is_complete() {
            return Err(Error::ProtocolViolation(format!(
                "transfer {} ended after {} of {} bytes",
                self.transfer_id, self.received, self.expected
            )));
        }
        match self.buf {
            Buf::Discard => Err(Error::ProtocolViolation(format!(
                "transfer {} was received for nobody; its bytes were not kept",
                self.transfer_id
            ))),
            Buf::U32(mut w) => {
                if cfg!(target_endian = "big") {
                    w.iter_mut().for_each(|x| *x = u32::from_le(*x));
                }
                Ok(Bulk::Words(w))
            }
            Buf::F32(mut v) => {
                if cfg!(target_endian = "big") {
                    v.iter_mut().for_each(|x| *x = f32::from_bits(u32::from_le(x.to_bits())));
                }
                let params = if self.specs.len() == 1 {
                    // The received buffer becomes the tensor: no copy.
                    let s = &self.specs[0];
                    Parameters::new(vec![Tensor { name: s.name.clone(), shape: s.shape.clone(), data: v }])
                } else {
                    Parameters::from_flat(&self.specs, &v)
                };
                params.map(|p| Bulk::Params(Arc::new(p))).map_err(|e| Error::ProtocolViolation(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(n: usize) -> Parameters {
        Parameters::new(vec![
            Tensor { name: "a".into(), shape: vec![n], data: (0..n).map(|i| i as f32 * 0.5).collect() },
            Tensor { name: "b".into(), shape: vec![2, 2], data: vec![1.0, -2.0, f32::MIN_POSITIVE, 4.0] },
        ])
        .unwrap()
    }

    fn small_limits() -> Limits {
        Limits { chunk_bytes: 64, max_message_bytes: 2048, max_values: 1000, ..Limits::default() }
    }

    fn receive(e: &Encoded, limits: &Limits) -> Bulk {
        let mut inc = Incoming::start(&e.header, limits).unwrap();
        let cs: Vec<_> = chunks(e.header.transfer_id, &e.bytes, 64).collect();
        for c in &cs {
            assert!(!inc.is_complete());
            inc.push(c).unwrap();
        }
        inc.finish().unwrap()
    }

    #[test]
    fn round_trips_in_chunks() {
        let p = Arc::new(params(300));
        let e = encode(7, &Bulk::Params(p.clone()));
        assert!(chunks(7, &e.bytes, 64).count() > 10);
        assert_eq!(receive(&e, &small_limits()), Bulk::Params(p));
        let single = Arc::new(
            Parameters::new(vec![Tensor { name: "w".into(), shape: vec![3], data: vec![1.5, -0.0, 7.0] }]).unwrap(),
        );
        assert_eq!(receive(&encode(8, &Bulk::Params(single.clone())), &small_limits()), Bulk::Params(single));
        let words: Vec<u32> = (0..1001u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        assert_eq!(receive(&encode_words(9, words.clone()), &small_limits()), Bulk::Words(words.clone()));
        assert_eq!(receive(&encode(9, &Bulk::Words(words.clone())), &small_limits()), Bulk::Words(words));
    }

    #[test]
    fn rejects_oversized_and_lying_headers() {
        let mut header = encode(1, &Bulk::Params(Arc::new(params(2000)))).header;
        assert!(matches!(Incoming::start(&header, &small_limits()), Err(Error::LimitExceeded(_))));
        header.tensors[0].shape = vec![u64::MAX, 2];
        let e = Incoming::start(&header, &small_limits()).unwrap_err();
        assert!(e.to_string().contains("bulk.tensors[0].shape (a)"), "{e}");
        let mut header = encode(1, &Bulk::Params(Arc::new(params(10)))).header;
        header.total_bytes += 4;
        let e = Incoming::start(&header, &small_limits()).unwrap_err();
        assert!(matches!(&e, Error::ProtocolViolation(m) if m.contains("bulk.total_bytes")), "{e}");
        let mut header = encode_words(1, vec![1, 2]).header;
        header.kind = 0;
        assert!(Incoming::start(&header, &small_limits()).is_err(), "unknown kind");
        let words = encode_words(1, vec![0; 1002]).header;
        assert!(matches!(Incoming::start(&words, &small_limits()), Err(Error::LimitExceeded(_))));
    }

    #[test]
    fn rejects_out_of_order_oversized_and_extra_chunks() {
        let e = encode(3, &Bulk::Params(Arc::new(params(100))));
        let cs: Vec<_> = chunks(3, &e.bytes, 64).collect();
        let mut inc = Incoming::start(&e.header, &small_limits()).unwrap();
        assert!(inc.push(&cs[1]).is_err());
        assert!(inc.push(&pb::Chunk { transfer_id: 4, ..cs[0].clone() }).is_err());
        // Larger than a message can carry (2048 − 1024 bytes), even though
        // the transfer announced more bytes than that.
        let big = encode(3, &Bulk::Params(Arc::new(params(900))));
        let mut oversized = Incoming::start(&big.header, &small_limits()).unwrap();
        let too_big = pb::Chunk { transfer_id: 3, offset: 0, data: vec![0; 1028].into() };
        assert!(matches!(oversized.push(&too_big), Err(Error::LimitExceeded(_))));
        // A peer using larger chunks than this end's own `chunk_bytes` is fine.
        oversized.push(&pb::Chunk { transfer_id: 3, offset: 0, data: vec![0; 1024].into() }).unwrap();
        let mut inc = Incoming::start(&e.header, &small_limits()).unwrap();
        for c in &cs {
            inc.push(c).unwrap();
        }
        let end = e.bytes.len() as u64;
        assert!(inc.push(&pb::Chunk { transfer_id: 3, offset: end, data: vec![0; 4].into() }).is_err());
        let mut short = Incoming::start(&e.header, &small_limits()).unwrap();
        short.push(&cs[0]).unwrap();
        let err = short.finish().unwrap_err();
        assert!(err.to_string().contains("transfer 3 ended after 64 of"), "{err}");
    }

    /// Two tensors of one name are refused from the header, before any
    /// byte arrives (they used to be found once all had), naming the field.
    #[test]
    fn a_tensor_name_announced_twice_is_refused_from_the_header() {
        let mut header = encode(1, &Bulk::Params(Arc::new(params(10)))).header;
        header.tensors[1].name = "a".into();
        let err = Incoming::start(&header, &small_limits()).unwrap_err();
        assert!(err.to_string().contains("bulk.tensors[1].name \"a\" is announced twice"), "{err}");
        assert!(Incoming::start_discarding(&header, &small_limits()).is_err());
    }

    /// A transfer received for nobody is checked as strictly (header, order,
    /// sizes) but keeps no byte: nothing of the announced size is
    /// allocated, and it yields nothing.
    #[test]
    fn a_discarded_transfer_is_checked_but_keeps_nothing() {
        let e = encode(3, &Bulk::Params(Arc::new(params(100))));
        let cs: Vec<_> = chunks(3, &e.bytes, 64).collect();
        let mut inc = Incoming::start_discarding(&e.header, &small_limits()).unwrap();
        assert!(inc.is_discarding() && matches!(inc.buf, Buf::Discard));
        assert!(inc.push(&cs[1]).is_err(), "out of order");
        for c in &cs {
            inc.push(c).unwrap();
        }
        assert!(inc.is_complete());
        let end = e.bytes.len() as u64;
        assert!(inc.push(&pb::Chunk { transfer_id: 3, offset: end, data: vec![0; 4].into() }).is_err());
        assert!(inc.finish().unwrap_err().to_string().contains("for nobody"));
        let oversized = encode(1, &Bulk::Params(Arc::new(params(2000)))).header;
        assert!(matches!(Incoming::start_discarding(&oversized, &small_limits()), Err(Error::LimitExceeded(_))));
        assert!(!Incoming::start(&e.header, &small_limits()).unwrap().is_discarding());
    }
}
