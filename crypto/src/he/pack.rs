//! Dense little-endian bit packing of k-bit coefficients: the wire form of
//! ciphertexts and decryption shares (k = 62 for values mod q, the switched
//! width for values mod 2^k), so uploads cost k/32 of the f32 update.

use crate::Error;

/// Bytes needed for `count` values of `bits` bits.
pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Appends `values` (each below 2^bits) to `out`, `bits` bits each.
pub fn pack(values: &[u64], bits: u32, out: &mut Vec<u8>) {
    debug_assert!((1..=64).contains(&bits));
    out.reserve(packed_len(values.len(), bits));
    let mut acc: u128 = 0;
    let mut held: u32 = 0;
    for &v in values {
        acc |= (v as u128) << held;
        held += bits;
        while held >= 64 {
            out.extend_from_slice(&(acc as u64).to_le_bytes());
            acc >>= 64;
            held -= 64;
        }
    }
    let tail = held.div_ceil(8) as usize;
    out.extend_from_slice(&(acc as u64).to_le_bytes()[..tail]);
}

/// Reads `count` values of `bits` bits from exactly [`packed_len`] bytes;
/// `what` names the field in errors. Padding bits must be zero, so each value
/// has one encoding.
pub fn unpack(bytes: &[u8], count: usize, bits: u32, what: &str) -> Result<Vec<u64>, Error> {
    let expected = packed_len(count, bits);
    if bytes.len() != expected {
        return Err(Error::InvalidInput(format!("{what}: {} bytes, expected {expected}", bytes.len())));
    }
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let mut out = vec![0u64; count];
    let mut acc: u128 = 0;
    let mut held: u32 = 0;
    let mut words = bytes.chunks_exact(8);
    let mut tail = words.remainder();
    for o in out.iter_mut() {
        if held < bits {
            // The length check above guarantees the bits are there: whole
            // words first, then the short tail once.
            let (w, n) = match words.next() {
                Some(c) => (u64::from_le_bytes(c.try_into().unwrap_or([0; 8])), 64),
                None => {
                    let mut w = [0u8; 8];
                    w[..tail.len()].copy_from_slice(tail);
                    let n = 8 * tail.len() as u32;
                    tail = &[];
                    (u64::from_le_bytes(w), n)
                }
            };
            acc |= (w as u128) << held;
            held += n;
        }
        *o = acc as u64 & mask;
        acc >>= bits;
        held -= bits;
    }
    if acc != 0 {
        return Err(Error::InvalidInput(format!("{what}: nonzero padding bits")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_answer() {
        let mut out = Vec::new();
        pack(&[1, 2, 3], 3, &mut out);
        // 001 | 010 | 011 → bits 0..9 = 0b011_010_001
        assert_eq!(out, vec![0b1101_0001, 0b0000_0000]);
        assert_eq!(unpack(&out, 3, 3, "x").unwrap(), vec![1, 2, 3]);
        assert!(unpack(&[0xff, 0xff], 3, 3, "c0").unwrap_err().to_string().contains("c0: nonzero padding"));
        assert!(unpack(&[0], 3, 3, "c1").unwrap_err().to_string().contains("c1: 1 bytes, expected 2"));
    }

    proptest! {
        #[test]
        fn round_trips(bits in 1u32..=64, seed in any::<u64>(), count in 0usize..300) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            let values: Vec<u64> = (0..count).map(|_| rng.random::<u64>() & mask).collect();
            let mut out = Vec::new();
            pack(&values, bits, &mut out);
            prop_assert_eq!(out.len(), packed_len(count, bits));
            prop_assert_eq!(unpack(&out, count, bits, "v").unwrap(), values);
        }
    }
}
