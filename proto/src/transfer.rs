//! Chunked transfer of model parameters.
//!
//! A sender emits one [`pb::ParamsHeader`] and then [`pb::Chunk`]s of at most
//! `chunk_bytes`, in order. A receiver starts an [`Incoming`] from the header,
//! which checks the declared sizes against [`Limits`] *before* allocating, and
//! then accepts only in-order chunks that fit what was declared.

use confide_algorithms::{Parameters, TensorSpec};

use crate::{Error, Limits, pb};

/// Encodes `params` as a header plus the little-endian bytes to chunk.
pub fn encode(transfer_id: u64, params: &Parameters) -> (pb::ParamsHeader, Vec<u8>) {
    let tensors = params
        .tensors()
        .iter()
        .map(|t| pb::TensorSpec { name: t.name.clone(), shape: t.shape.iter().map(|&d| d as u64).collect() })
        .collect();
    let mut bytes = Vec::with_capacity(params.num_values() * 4);
    for t in params.tensors() {
        bytes.extend_from_slice(&word_bytes(bytemuck::cast_slice(&t.data)));
    }
    (pb::ParamsHeader { transfer_id, tensors, total_bytes: bytes.len() as u64 }, bytes)
}

/// The header of a transfer of `len` raw 32-bit words (a masked vector in
/// Z_{2^b}) as one tensor named `name`; [`word_bytes`] gives the bytes to chunk.
pub fn words_header(transfer_id: u64, name: &str, len: usize) -> pb::ParamsHeader {
    let spec = pb::TensorSpec { name: name.to_owned(), shape: vec![len as u64] };
    pb::ParamsHeader { transfer_id, tensors: vec![spec], total_bytes: len as u64 * 4 }
}

/// The little-endian bytes of `words`: on little-endian machines a view of
/// the words themselves, so a multi-megabyte vector is not copied to be sent.
pub fn word_bytes(words: &[u32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(words))
    } else {
        std::borrow::Cow::Owned(words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }
}

/// 32-bit little-endian values from `bytes` (a multiple of 4 long).
fn words_from_le<T: bytemuck::Pod>(bytes: &[u8], from_le: impl Fn([u8; 4]) -> T) -> Vec<T> {
    if cfg!(target_endian = "little") {
        let n = bytes.len() / 4;
        let mut out = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes[..n * 4]);
        out
    } else {
        bytes.chunks_exact(4).map(|c| from_le([c[0], c[1], c[2], c[3]])).collect()
    }
}

/// Splits encoded bytes into chunks of at most `chunk_bytes`.
pub fn chunks(transfer_id: u64, bytes: &[u8], chunk_bytes: usize) -> impl Iterator<Item = pb::Chunk> + '_ {
    bytes.chunks(chunk_bytes.max(4)).scan(0u64, move |offset, c| {
        let chunk = pb::Chunk { transfer_id, offset: *offset, data: c.to_vec() };
        *offset += c.len() as u64;
        Some(chunk)
    })
}

/// A transfer being received.
#[derive(Debug)]
pub struct Incoming {
    transfer_id: u64,
    specs: Vec<TensorSpec>,
    expected: usize,
    buf: Vec<u8>,
    chunk_bytes: usize,
}

impl Incoming {
    /// Checks a header against `limits` and prepares to receive its chunks.
    pub fn start(header: &pb::ParamsHeader, limits: &Limits) -> Result<Incoming, Error> {
        if header.tensors.len() > limits.max_tensors {
            return Err(Error::LimitExceeded(format!(
                "{} tensors announced; limit is {}",
                header.tensors.len(),
                limits.max_tensors
            )));
        }
        let mut specs = Vec::with_capacity(header.tensors.len());
        let mut values = 0usize;
        for t in &header.tensors {
            if t.name.is_empty() || t.name.len() > 256 {
                return Err(Error::ProtocolViolation("tensor name must be 1 to 256 bytes".into()));
            }
            let shape: Vec<usize> = t
                .shape
                .iter()
                .map(|&d| usize::try_from(d).ok().filter(|&d| d <= limits.max_values))
                .collect::<Option<_>>()
                .ok_or_else(|| Error::LimitExceeded(format!("tensor {}: dimension above limit", t.name)))?;
            let spec = TensorSpec { name: t.name.clone(), shape };
            let n =
                spec.num_values().ok_or_else(|| Error::LimitExceeded(format!("tensor {}: shape overflows", t.name)))?;
            values = values.checked_add(n).filter(|&v| v <= limits.max_values).ok_or_else(|| {
                Error::LimitExceeded(format!("more than {} parameter values announced", limits.max_values))
            })?;
            specs.push(spec);
        }
        if header.total_bytes != (values as u64) * 4 {
            return Err(Error::ProtocolViolation(format!(
                "total_bytes {} does not match the {values} values the shapes imply",
                header.total_bytes
            )));
        }
        Ok(Incoming {
            transfer_id: header.transfer_id,
            specs,
            expected: values * 4,
            buf: Vec::with_capacity(values * 4),
            chunk_bytes: limits.chunk_bytes,
        })
    }

    /// The transfer this belongs to.
    pub fn transfer_id(&self) -> u64 {
        self.transfer_id
    }

    /// Whether every declared byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.buf.len() == self.expected
    }

    /// Appends one chunk; it must continue exactly where the last one ended.
    pub fn push(&mut self, chunk: &pb::Chunk) -> Result<(), Error> {
        if chunk.transfer_id != self.transfer_id {
            return Err(Error::ProtocolViolation(format!(
                "chunk of transfer {} while transfer {} is open",
                chunk.transfer_id, self.transfer_id
            )));
        }
        if chunk.offset != self.buf.len() as u64 {
            return Err(Error::ProtocolViolation(format!(
                "chunk at offset {} where {} was expected",
                chunk.offset,
                self.buf.len()
            )));
        }
        if chunk.data.is_empty() || chunk.data.len() > self.chunk_bytes {
            return Err(Error::LimitExceeded(format!(
                "chunk of {} bytes; chunks must hold 1 to {} bytes",
                chunk.data.len(),
                self.chunk_bytes
            )));
        }
        if self.buf.len() + chunk.data.len() > self.expected {
            return Err(Error::ProtocolViolation(format!("chunks exceed the {} bytes announced", self.expected)));
        }
        self.buf.extend_from_slice(&chunk.data);
        Ok(())
    }

    /// The received bytes as raw 32-bit words (for [`words_header`] transfers).
    pub fn finish_words(self) -> Result<Vec<u32>, Error> {
        if !self.is_complete() || self.specs.len() != 1 {
            return Err(Error::ProtocolViolation("a word transfer is one complete tensor".into()));
        }
        Ok(words_from_le(&self.buf, u32::from_le_bytes))
    }

    /// The received parameters; fails if bytes are missing.
    pub fn finish(self) -> Result<Parameters, Error> {
        if !self.is_complete() {
            return Err(Error::ProtocolViolation(format!(
                "transfer ended after {} of {} bytes",
                self.buf.len(),
                self.expected
            )));
        }
        let flat: Vec<f32> = words_from_le(&self.buf, f32::from_le_bytes);
        Parameters::from_flat(&self.specs, &flat).map_err(|e| Error::ProtocolViolation(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::Tensor;

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

    #[test]
    fn round_trips_in_chunks() {
        let p = params(300);
        let (header, bytes) = encode(7, &p);
        let mut inc = Incoming::start(&header, &small_limits()).unwrap();
        let cs: Vec<_> = chunks(7, &bytes, 64).collect();
        assert!(cs.len() > 10);
        for c in &cs {
            assert!(!inc.is_complete());
            inc.push(c).unwrap();
        }
        assert_eq!(inc.finish().unwrap(), p);
    }

    #[test]
    fn rejects_oversized_and_lying_headers() {
        let (mut header, _) = encode(1, &params(2000));
        assert!(matches!(Incoming::start(&header, &small_limits()), Err(Error::LimitExceeded(_))));
        header.tensors[0].shape = vec![u64::MAX, 2];
        assert!(Incoming::start(&header, &small_limits()).is_err());
        let (mut header, _) = encode(1, &params(10));
        header.total_bytes += 4;
        assert!(matches!(Incoming::start(&header, &small_limits()), Err(Error::ProtocolViolation(_))));
    }

    #[test]
    fn rejects_out_of_order_oversized_and_extra_chunks() {
        let (header, bytes) = encode(3, &params(100));
        let cs: Vec<_> = chunks(3, &bytes, 64).collect();
        let mut inc = Incoming::start(&header, &small_limits()).unwrap();
        assert!(inc.push(&cs[1]).is_err());
        assert!(inc.push(&pb::Chunk { transfer_id: 4, ..cs[0].clone() }).is_err());
        assert!(inc.push(&pb::Chunk { transfer_id: 3, offset: 0, data: vec![0; 68] }).is_err());
        let mut inc = Incoming::start(&header, &small_limits()).unwrap();
        for c in &cs {
            inc.push(c).unwrap();
        }
        assert!(inc.push(&pb::Chunk { transfer_id: 3, offset: bytes.len() as u64, data: vec![0; 4] }).is_err());
        let mut short = Incoming::start(&header, &small_limits()).unwrap();
        short.push(&cs[0]).unwrap();
        assert!(short.finish().is_err());
    }
}
