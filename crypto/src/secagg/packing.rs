//! Masked inputs on the wire at the modulus's width: each value in
//! Z_{2^b} takes b bits instead of a whole 32-bit word, so a round at
//! 24 bits moves three quarters of the bytes. Values are laid end to end,
//! least significant bit first, in little-endian u32 words; the last
//! word's unused high bits are zero, and a message whose are not is
//! refused, so every input has exactly one encoding.

/// Words that `count` values of `bits` bits fill.
pub fn packed_words(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(32)
}

/// `values` (each below 2^bits, `bits` in 1..=32) packed `bits` bits each.
pub fn pack(values: &[u32], bits: u32) -> Vec<u32> {
    debug_assert!((1..=32).contains(&bits));
    debug_assert!(bits == 32 || values.iter().all(|&v| v >> bits == 0), "a value wider than {bits} bits");
    if bits == 32 {
        return values.to_vec();
    }
    let mut out = Vec::with_capacity(packed_words(values.len(), bits));
    let mut rest = values;
    if bits == 24 {
        // Four values make three words: shifts only, over fixed-size
        // chunks, which vectorise.
        let (quads, tail) = values.as_chunks::<4>();
        out.resize(3 * quads.len(), 0);
        let (triples, _) = out.as_chunks_mut::<3>();
        for (t, &[a, b, c, d]) in triples.iter_mut().zip(quads) {
            *t = [a | b << 24, b >> 8 | c << 16, c >> 16 | d << 8];
        }
        rest = tail;
    }
    let mut acc: u64 = 0;
    let mut held: u32 = 0;
    for &v in rest {
        acc |= u64::from(v) << held;
        held += bits;
        if held >= 32 {
            out.push(acc as u32);
            acc >>= 32;
            held -= 32;
        }
    }
    if held > 0 {
        out.push(acc as u32);
    }
    out
}

/// The `count` values of `bits` bits that `words` hold, or why they are not
/// a packing of that many: another length, or nonzero bits past the last
/// value. At 32 bits the words are the values, returned without a copy.
pub fn unpack(words: Vec<u32>, count: usize, bits: u32) -> Result<Vec<u32>, String> {
    let expected = packed_words(count, bits);
    if words.len() != expected {
        return Err(format!("{} words for {count} values of {bits} bits; expected {expected}", words.len()));
    }
    if bits == 32 {
        return Ok(words);
    }
    let words = &words[..];
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(count);
    let mut from = words;
    if bits == 24 {
        let quads = count / 4;
        let (triples, _) = words[..3 * quads].as_chunks::<3>();
        out.resize(4 * quads, 0);
        let (values, _) = out.as_chunks_mut::<4>();
        for (v, &[x, y, z]) in values.iter_mut().zip(triples) {
            *v = [x & mask, (x >> 24 | y << 8) & mask, (y >> 16 | z << 16) & mask, z >> 8];
        }
        from = &words[3 * quads..];
    }
    let mut acc: u64 = 0;
    let mut held: u32 = 0;
    let mut next = from.iter();
    while out.len() < count {
        if held < bits {
            // There is a next word: the length was checked.
            acc |= u64::from(next.next().copied().unwrap_or(0)) << held;
            held += 32;
        }
        out.push(acc as u32 & mask);
        acc >>= bits;
        held -= bits;
    }
    if acc != 0 {
        return Err(format!("nonzero bits past the last of {count} values of {bits} bits"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every width, every length (the fast four-value path and the
        /// general one, with remainders): unpacking gives the values back,
        /// in the expected number of words.
        #[test]
        fn packing_round_trips(bits in 1u32..=32, raw in proptest::collection::vec(any::<u32>(), 0..70)) {
            let mask = if bits == 32 { u32::MAX } else { (1 << bits) - 1 };
            let values: Vec<u32> = raw.iter().map(|v| v & mask).collect();
            let words = pack(&values, bits);
            prop_assert_eq!(words.len(), packed_words(values.len(), bits));
            prop_assert_eq!(unpack(words, values.len(), bits).unwrap(), values);
        }

        /// Bits past the last value are refused, so an input has one
        /// encoding; so is another length.
        #[test]
        fn padding_bits_and_other_lengths_are_refused(
            bits in 1u32..32,
            raw in proptest::collection::vec(any::<u32>(), 1..70),
            bit in 0u32..32,
        ) {
            let mask = (1u32 << bits) - 1;
            let values: Vec<u32> = raw.iter().map(|v| v & mask).collect();
            let mut words = pack(&values, bits);
            let used = (values.len() * bits as usize % 32) as u32;
            if used != 0 && bit >= used {
                let last = words.len() - 1;
                words[last] |= 1 << bit;
                prop_assert!(unpack(words.clone(), values.len(), bits).unwrap_err().contains("nonzero bits"));
                words[last] &= !(1 << bit);
            }
            words.push(0);
            prop_assert!(unpack(words, values.len(), bits).unwrap_err().contains("expected"));
        }
    }

    #[test]
    fn twenty_four_bits_take_three_quarters_of_the_words() {
        let values: Vec<u32> = (0..1000u32).map(|i| i.wrapping_mul(2_654_435_761) >> 8).collect();
        let words = pack(&values, 24);
        assert_eq!(words.len(), 750);
        // The layout: least significant bits first, end to end.
        assert_eq!(words[0], values[0] | values[1] << 24);
        assert_eq!(unpack(words, 1000, 24).unwrap(), values);
    }
}
