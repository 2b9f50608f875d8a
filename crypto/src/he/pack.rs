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
    let start = out.len();
    let len = packed_len(values.len(), bits);
    // Whole words stored into the sized buffer (no per-word capacity check;
    // callers reserve the exact size, so no slack that would regrow it).
    out.resize(start + len, 0);
    let dst = &mut out[start..];
    let mut acc: u128 = 0;
    let mut held: u32 = 0;
    let mut at = 0usize;
    for &v in values {
        acc |= (v as u128) << held;
        held += bits;
        if held >= 64 {
            dst[at..at + 8].copy_from_slice(&(acc as u64).to_le_bytes());
            at += 8;
            acc >>= 64;
            held -= 64;
        }
    }
    // What is left is the last, partial word: len − at < 8 bytes.
    let rest = len - at;
    dst[at..].copy_from_slice(&(acc as u64).to_le_bytes()[..rest]);
}

/// The value (mask `mask`) starting at bit `bit` of `bytes`, reading the 16
/// bytes from its first byte, which the caller guarantees are there.
#[inline(always)]
fn read(bytes: &[u8], bit: usize, mask: u64) -> u64 {
    let mut w = [0u8; 16];
    w.copy_from_slice(&bytes[bit / 8..bit / 8 + 16]);
    (u128::from_le_bytes(w) >> (bit % 8)) as u64 & mask
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
    let b = bits as usize;
    // Checked before anything is decoded, so that a refusal leaves no
    // decoded copy (of what may be a key share) behind.
    let used = count * b % 8;
    if used != 0 && bytes.last().is_some_and(|&last| last >> used != 0) {
        return Err(Error::InvalidInput(format!("{what}: nonzero padding bits")));
    }
    // Values whose 16-byte window lies inside `bytes` are read in place (one
    // unaligned load and a shift each, no branch); the last few from a
    // zero-padded copy of the tail.
    let direct = if bytes.len() >= 16 { ((bytes.len() - 16) * 8 / b + 1).min(count) } else { 0 };
    let mut out = Vec::with_capacity(count);
    out.extend((0..direct).map(|i| read(bytes, i * b, mask)));
    if direct < count {
        let from = direct * b / 8;
        // At most 16 bytes are left after `from` (direct·b > (len − 16)·8,
        // so from ≥ len − 16), so the zero-padded tail fits 32 bytes. On
        // the stack and wiped after use, not a heap copy left behind: the
        // bytes can be a secret key share's (found by review).
        let mut tail = zeroize::Zeroizing::new([0u8; 32]);
        let left = bytes.len() - from;
        tail.get_mut(..left)
            .ok_or_else(|| Error::InvalidInput(format!("{what}: {left} bytes left for the last values")))?
            .copy_from_slice(&bytes[from..]);
        let skip = direct * b - from * 8;
        out.extend((0..count - direct).map(|i| read(&tail[..left + 16], skip + i * b, mask)));
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

    /// The layout bit by bit: value i's bit j is bit i·bits + j of the
    /// little-endian byte string.
    fn reference(values: &[u64], bits: u32) -> Vec<u8> {
        let mut out = vec![0u8; packed_len(values.len(), bits)];
        for (i, &v) in values.iter().enumerate() {
            for j in 0..bits as usize {
                if v >> j & 1 == 1 {
                    let bit = i * bits as usize + j;
                    out[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_the_bit_by_bit_layout(bits in 1u32..=64, seed in any::<u64>(), count in 0usize..200, prefix in 0usize..3) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            let values: Vec<u64> = (0..count).map(|_| rng.random::<u64>() & mask).collect();
            // Appends after what `out` already holds.
            let mut out = vec![0xAB; prefix];
            pack(&values, bits, &mut out);
            prop_assert_eq!(&out[..prefix], &vec![0xAB; prefix][..]);
            prop_assert_eq!(&out[prefix..], &reference(&values, bits)[..]);
        }

        #[test]
        fn any_nonzero_padding_is_refused(bits in 1u32..=63, count in 1usize..100, pad in 1u8..=255) {
            let values = vec![0u64; count];
            let mut out = Vec::new();
            pack(&values, bits, &mut out);
            let used = (count * bits as usize % 8) as u32;
            prop_assume!(used != 0);
            let pad = pad << used;
            prop_assume!(pad != 0);
            if let Some(last) = out.last_mut() {
                *last |= pad;
            }
            prop_assert!(unpack(&out, count, bits, "x").is_err());
        }

        /// Any byte string of the right length (untrusted input) is either
        /// refused or read as values that pack back to exactly those bytes:
        /// no panic, one encoding per value.
        #[test]
        fn arbitrary_bytes_are_refused_or_canonical(bits in 1u32..=64, count in 0usize..40, seed in any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let bytes: Vec<u8> = (0..packed_len(count, bits)).map(|_| rng.random()).collect();
            if let Ok(values) = unpack(&bytes, count, bits, "x") {
                let mut again = Vec::new();
                pack(&values, bits, &mut again);
                prop_assert_eq!(again, bytes);
            }
        }

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
