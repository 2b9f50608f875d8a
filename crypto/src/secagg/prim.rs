//! Primitives of secure aggregation: key derivation, the AES-CTR mask PRG and
//! end-to-end share encryption (AES-256-GCM).

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use aes_vaes::cipher::{BlockCipherEncrypt, KeyInit as _};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::Error;

// AES-128-CTR with a 32-bit big-endian block counter (the `ctr` crate's
// `Ctr32BE`, against which the tests check it): the stream of one seed is at
// most 2^32 blocks (64 GiB), far above any vector length. The counter blocks
// are built here and encrypted in bulk with `encrypt_blocks_b2b`, which keeps
// the AES pipelines busy (VAES where the CPU has it, AES-NI otherwise; the
// `aes` crate decides at run time): about twice the throughput of the `ctr`
// crate's keystream, and masking is most of what secure aggregation adds to
// a round. Every stream of a round has its own key (a fresh HKDF output)
// and the round's IV, so one set of counter blocks serves all of them (a
// quarter less masking time than a set per stream); no key ever meets the
// same counter block twice, which is all CTR needs. See "The round" in
// docs/secure-aggregation.md for what a shared IV could weaken (multi-key
// search) and why it does not here.
type KeyBlock = aes_vaes::Block;

const SALT: &[u8] = b"confide-secagg-v1";

/// Binds derived keys to their purpose, job, round and parties: no key is
/// ever used for two purposes or in two rounds.
pub fn context(label: &str, job: &str, round: u32, parties: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in [label.as_bytes(), job.as_bytes()] {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&round.to_le_bytes());
    for p in parties {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p.as_bytes());
    }
    out
}

/// HKDF-SHA256 of `ikm` for `info`, 32 bytes.
pub fn derive(ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF's limit of 255 * 32, so expand cannot fail.
    let _ = Hkdf::<Sha256>::new(Some(SALT), ikm).expand(info, out.as_mut());
    out
}

/// Bit mask of `bits`-bit values.
pub fn value_mask(bits: u32) -> u32 {
    if bits >= 32 { u32::MAX } else { (1u32 << bits) - 1 }
}

/// The first 12 bytes of every counter block of a round's mask streams: one
/// value per job and round ([`mask_iv`]), so that the counter blocks are the
/// same for every stream of the round and are built once for all of them.
pub type MaskIv = [u8; 12];

/// The counter blocks' IV of the mask streams of `job`'s `round`.
pub fn mask_iv(job: &str, round: u32) -> MaskIv {
    let d = derive(b"confide mask iv", &context("mask-iv", job, round, &[]));
    let mut iv = [0u8; 12];
    iv.copy_from_slice(&d[..12]);
    iv
}

/// Adds (`negate = false`) or subtracts the mask stream of `seed` to `acc`,
/// modulo 2^bits. The stream is AES-128-CTR keyed by the seed's first half,
/// its counter blocks the round's `iv` followed by a 32-bit big-endian block
/// counter from 0: one AES block yields four 32-bit mask words. (The seed's
/// second half is not used: every seed is a fresh HKDF output that keys one
/// stream.)
pub fn apply_mask(acc: &mut [u32], iv: &MaskIv, seed: &[u8; 32], bits: u32, negate: bool) {
    apply_masks(acc, iv, &[(seed, negate)], bits);
}

/// Applies several mask streams in one pass over `acc`: block by block, every
/// stream is added while the block is in L1 cache, instead of one full pass
/// over a multi-megabyte vector per stream. Long vectors are split across the
/// machine's cores, each part seeking its streams to its own offset.
pub fn apply_masks(acc: &mut [u32], iv: &MaskIv, masks: &[(&[u8; 32], bool)], bits: u32) {
    // Several maskings at once (parties sharing a machine, a server
    // unmasking while parties mask) share the cores instead of each
    // spawning one thread per core.
    let active = ActiveMasking::enter();
    let parts = parallel_parts(acc.len()).div_ceil(active.count()).max(1);
    if parts <= 1 {
        MaskStreams::new(iv, masks, bits).apply_all(acc);
        return;
    }
    // Part boundaries fall on AES block boundaries (4 words), so each part
    // starts its streams at a whole counter value.
    let part_len = acc.len().div_ceil(parts).next_multiple_of(4);
    std::thread::scope(|scope| {
        for (i, part) in acc.chunks_mut(part_len).enumerate() {
            scope.spawn(move || MaskStreams::starting_at(iv, masks, bits, i * part_len).apply_all(part));
        }
    });
}

/// Counts the maskings in progress in this process.
struct ActiveMasking(usize);

static ACTIVE_MASKINGS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl ActiveMasking {
    fn enter() -> Self {
        ActiveMasking(ACTIVE_MASKINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
    }
    fn count(&self) -> usize {
        self.0
    }
}

impl Drop for ActiveMasking {
    fn drop(&mut self) {
        ACTIVE_MASKINGS.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Words below which splitting a vector across threads costs more than it saves.
const PARALLEL_MIN_WORDS: usize = 1 << 16;

/// How many threads to mask `len` words with: one per core, at most one per
/// [`PARALLEL_MIN_WORDS`].
fn parallel_parts(len: usize) -> usize {
    // Asked once: the answer reads cgroup files on Linux.
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cores.min(len / PARALLEL_MIN_WORDS).max(1)
}

/// One mask stream: its cipher, whether it is subtracted, and the words of
/// its last keystream block when a block of the vector ended mid-block.
struct MaskStream {
    /// Encryption only: no decryption key schedule is expanded.
    cipher: aes_vaes::Aes128Enc,
    negate: bool,
    carry: [u32; 4],
}

/// Encrypts the counter blocks into `out` (equal lengths by construction;
/// block by block otherwise, never a panic).
fn encrypt_counters(cipher: &aes_vaes::Aes128Enc, counters: &[KeyBlock], out: &mut [KeyBlock]) {
    if cipher.encrypt_blocks_b2b(counters, out).is_err() {
        for (o, c) in out.iter_mut().zip(counters) {
            cipher.encrypt_block_b2b(c, o);
        }
    }
}

/// Several mask streams advanced together over consecutive blocks of a
/// vector, from any word offset, so one vector can be masked in parts
/// (one per core) with each block kept in L1 while every stream is added.
/// The streams share their counter blocks (one IV per round): each block's
/// are built once and encrypted under every stream's key.
pub struct MaskStreams {
    streams: Vec<MaskStream>,
    bits_mask: u32,
    /// The IV in the counter blocks' upper 96 bits.
    iv: u128,
    /// The next keystream block's counter (wrapping as `Ctr32BE` does).
    counter: u32,
    /// Words of every stream's last keystream block not yet used (0..=3).
    carried: usize,
    counters: Vec<KeyBlock>,
    keystream: Vec<KeyBlock>,
}

/// The counter block of keystream block `counter` under `iv` (the IV in
/// the upper 96 bits, the counter big-endian in the lower 32).
fn counter_block(iv: u128, counter: u32) -> KeyBlock {
    (iv | u128::from(counter)).to_be_bytes().into()
}

fn word(b: &KeyBlock, j: usize) -> u32 {
    // Keystream bytes read as little-endian words, so the masks are the
    // same on every platform.
    u32::from_le_bytes([b[4 * j], b[4 * j + 1], b[4 * j + 2], b[4 * j + 3]])
}

impl Drop for MaskStreams {
    fn drop(&mut self) {
        // The last keystream blocks are mask material: wipe them (the AES
        // key schedules wipe themselves, with aes's `zeroize` feature; the
        // counter blocks are public).
        use zeroize::Zeroize;
        for b in &mut self.keystream {
            b.as_mut_slice().zeroize();
        }
        for s in &mut self.streams {
            s.carry.zeroize();
        }
    }
}

impl MaskStreams {
    /// Words per block in [`apply_masks`].
    pub const BLOCK: usize = 2048;

    /// Streams for `(seed, subtract)` pairs under the round's `iv`, modulo 2^bits.
    pub fn new(iv: &MaskIv, masks: &[(&[u8; 32], bool)], bits: u32) -> MaskStreams {
        Self::starting_at(iv, masks, bits, 0)
    }

    /// The same streams from word `first_word` on, to mask the part of a
    /// vector that starts there.
    pub fn starting_at(iv: &MaskIv, masks: &[(&[u8; 32], bool)], bits: u32, first_word: usize) -> MaskStreams {
        let streams = masks
            .iter()
            .map(|(seed, negate)| {
                let mut key = [0u8; 16];
                key.copy_from_slice(&seed[..16]);
                // From a reference: no unwiped copy of the key.
                let cipher = aes_vaes::Aes128Enc::new((&key).into());
                zeroize::Zeroize::zeroize(&mut key);
                MaskStream { cipher, negate: *negate, carry: [0; 4] }
            })
            .collect();
        let mut high = [0u8; 16];
        high[..12].copy_from_slice(iv);
        let mut m = MaskStreams {
            streams,
            bits_mask: value_mask(bits),
            iv: u128::from_be_bytes(high),
            // 4 words per AES block; the 32-bit counter covers 2^34 words.
            counter: (first_word / 4) as u32,
            carried: 0,
            counters: vec![KeyBlock::default(); Self::BLOCK / 4],
            keystream: vec![KeyBlock::default(); Self::BLOCK / 4],
        };
        let skip = first_word % 4;
        if skip > 0 {
            // The rest of the block the part starts in, carried.
            m.counters[0] = counter_block(m.iv, m.counter);
            let MaskStreams { streams, counters, keystream, .. } = &mut m;
            for s in streams.iter_mut() {
                encrypt_counters(&s.cipher, &counters[..1], &mut keystream[..1]);
                for j in skip..4 {
                    s.carry[j] = word(&keystream[0], j);
                }
            }
            m.counter = m.counter.wrapping_add(1);
            m.carried = 4 - skip;
        }
        m
    }

    /// Applies the streams to all of `acc`, block by block.
    pub fn apply_all(&mut self, acc: &mut [u32]) {
        for block in acc.chunks_mut(Self::BLOCK) {
            self.apply(block);
        }
    }

    /// Adds or subtracts the next `block.len()` words of every stream.
    pub fn apply(&mut self, block: &mut [u32]) {
        let n = block.len();
        // Words left over from the previous call's last keystream blocks.
        let lead = self.carried.min(n);
        let from = 4 - self.carried;
        let full = (n - lead) / 4;
        let tail = (n - lead) % 4;
        let blocks = full + usize::from(tail > 0);
        if self.counters.len() < blocks {
            // Growing frees the old buffer: wipe its keystream first.
            for b in &mut self.keystream {
                zeroize::Zeroize::zeroize(b.as_mut_slice());
            }
            self.counters.resize(blocks, KeyBlock::default());
            self.keystream.resize(blocks, KeyBlock::default());
        }
        // The counter blocks, once for every stream.
        for (i, c) in self.counters[..blocks].iter_mut().enumerate() {
            *c = counter_block(self.iv, self.counter.wrapping_add(i as u32));
        }
        let MaskStreams { streams, counters, keystream, .. } = self;
        for s in streams.iter_mut() {
            let op: fn(u32, u32) -> u32 = if s.negate { u32::wrapping_sub } else { u32::wrapping_add };
            for (p, x) in block[..lead].iter_mut().enumerate() {
                *x = op(*x, s.carry[from + p]);
            }
            if blocks == 0 {
                continue;
            }
            let ks = &mut keystream[..blocks];
            encrypt_counters(&s.cipher, &counters[..blocks], ks);
            let body = &mut block[lead..lead + 4 * full];
            if s.negate {
                for (a, k) in body.chunks_exact_mut(4).zip(ks.iter()) {
                    for (j, x) in a.iter_mut().enumerate() {
                        *x = x.wrapping_sub(word(k, j));
                    }
                }
            } else {
                for (a, k) in body.chunks_exact_mut(4).zip(ks.iter()) {
                    for (j, x) in a.iter_mut().enumerate() {
                        *x = x.wrapping_add(word(k, j));
                    }
                }
            }
            if tail > 0 {
                let last = &ks[full];
                let start = lead + 4 * full;
                for j in 0..tail {
                    block[start + j] = op(block[start + j], word(last, j));
                }
                for j in tail..4 {
                    s.carry[j] = word(last, j);
                }
            }
        }
        self.carried = if blocks == 0 {
            self.carried - lead
        } else if tail > 0 {
            4 - tail
        } else {
            0
        };
        self.counter = self.counter.wrapping_add(blocks as u32);
        if self.bits_mask != u32::MAX {
            let m = self.bits_mask;
            block.iter_mut().for_each(|a| *a &= m);
        }
    }
}

/// Encrypts `plaintext` with AES-256-GCM under `key`, a fresh random nonce
/// and `aad`. Returns (nonce, ciphertext).
pub fn seal(
    key: &[u8; 32],
    plaintext: &[u8],
    aad: &[u8],
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<([u8; 12], Vec<u8>), Error> {
    let mut nonce = [0u8; 12];
    rng.fill_bytes(&mut nonce);
    Ok((nonce, seal_with_nonce(key, &nonce, plaintext, aad)?))
}

/// AES-256-GCM with an explicit nonce; only [`seal`] (fresh random nonces)
/// and the known-answer tests call it.
fn seal_with_nonce(key: &[u8; 32], nonce: &[u8; 12], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
    Aes256Gcm::new(key.into())
        .encrypt(Nonce::from_slice(nonce), Payload { msg: plaintext, aad })
        .map_err(|_| Error::InvalidInput("share encryption failed".into()))
}

/// Decrypts and authenticates; `None` when the ciphertext, nonce or AAD was
/// tampered with or the key is wrong.
pub fn open(key: &[u8; 32], nonce: &[u8; 12], ciphertext: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    Aes256Gcm::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad })
        .ok()
        .map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::KeyIvInit;
    use rand_core::OsRng;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // The vector's block 0xfcfdfeff starts at a word offset above 2^32.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn aes128_ctr_matches_nist_sp800_38a() {
        // NIST SP 800-38A F.5.1, CTR-AES128.Encrypt, first block.
        let key = [0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c];
        let iv = [0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff];
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(&key);
        let mut round_iv = [0u8; 12];
        round_iv.copy_from_slice(&iv[..12]);
        // The vector's counter block is the stream's block 0xfcfdfeff.
        let first_word = 4 * u32::from_be_bytes([iv[12], iv[13], iv[14], iv[15]]) as usize;
        let plain: [u8; 16] =
            [0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96, 0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93, 0x17, 0x2a];
        // Subtracting the keystream from the words of C gives P back, so
        // adding it to P's words must give C: check via the mask API.
        let mut acc: Vec<u32> = vec![0; 4];
        MaskStreams::starting_at(&round_iv, &[(&seed, false)], 32, first_word).apply_all(&mut acc);
        let ks: Vec<u8> = acc.iter().flat_map(|w| w.to_le_bytes()).collect();
        let ct: Vec<u8> = ks.iter().zip(plain).map(|(k, p)| k ^ p).collect();
        assert_eq!(hex(&ct), "874d6191b620e3261bef6864990db6ce");
    }

    #[test]
    fn hkdf_matches_rfc5869_case_1_structure_and_is_domain_separated() {
        // RFC 5869 test case 1 (with our salt replaced, so check HKDF itself).
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0u8..=0x0c).collect();
        let info: Vec<u8> = (0xf0u8..=0xf9).collect();
        let mut okm = [0u8; 42];
        Hkdf::<Sha256>::new(Some(&salt), &ikm).expand(&info, &mut okm).unwrap();
        assert_eq!(hex(&okm), "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
        let a = derive(b"k", &context("mask", "job", 1, &["a", "b"]));
        let b = derive(b"k", &context("mask", "job", 2, &["a", "b"]));
        let c = derive(b"k", &context("share", "job", 1, &["a", "b"]));
        let d = derive(b"k", &context("mask", "jo", 1, &["ba", "b"]));
        assert!(*a != *b && *a != *c && *a != *d);
    }

    #[test]
    fn aes256_gcm_matches_the_gcm_spec_test_case_14() {
        // McGrew & Viega, "The Galois/Counter Mode of Operation", test case 14.
        let ct = seal_with_nonce(&[0u8; 32], &[0u8; 12], &[0u8; 16], b"").unwrap();
        assert_eq!(hex(&ct), "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919");
        assert_eq!(open(&[0u8; 32], &[0u8; 12], &ct, b"").unwrap().as_slice(), &[0u8; 16]);
    }

    #[test]
    fn key_derivation_and_mask_stream_known_answers() {
        // Vectors of Confide's own composition (HKDF-SHA256 with the confide
        // salt and length-prefixed context; AES-128-CTR masks read as
        // little-endian words under the round's IV), computed independently
        // with Python's hmac and the openssl CLI (`openssl enc -aes-128-ctr`).
        // A change here breaks interoperability between versions.
        let k = derive(b"shared secret", &context("pair-mask", "job-1", 7, &["a", "b"]));
        assert_eq!(hex(k.as_ref()), KDF_KAT);
        let iv = mask_iv("job-1", 7);
        assert_eq!(hex(&iv), IV_KAT);
        let mut m = vec![0u32; 4];
        apply_mask(&mut m, &iv, &k, 32, false);
        assert_eq!(m, MASK_KAT);
        assert_ne!(mask_iv("job-1", 8), iv, "each round has its own IV");
        assert_ne!(mask_iv("job-2", 7), iv, "each job has its own IV");
    }

    const KDF_KAT: &str = "1fcfd24069effcea6be64e2c318583ece0cb18ba90f0dea6a354e13abb6032e3";
    const IV_KAT: &str = "a08d9a21737fceac0c6beedb";
    const MASK_KAT: [u32; 4] = [3203321163, 263059558, 3122638722, 2461326619];

    #[test]
    fn masks_cancel_and_respect_bits() {
        let seed = [9u8; 32];
        let mut v = vec![5u32; 10_001];
        apply_mask(&mut v, &IV, &seed, 20, false);
        assert!(v.iter().all(|&x| x < 1 << 20));
        assert!(v.iter().any(|&x| x != 5));
        apply_mask(&mut v, &IV, &seed, 20, true);
        assert!(v.iter().all(|&x| x == 5));
    }

    #[test]
    fn fused_masks_equal_masks_applied_one_by_one() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut one = vec![3u32; 5000];
        apply_mask(&mut one, &IV, &a, 24, false);
        apply_mask(&mut one, &IV, &b, 24, true);
        let mut fused = vec![3u32; 5000];
        apply_masks(&mut fused, &IV, &[(&a, false), (&b, true)], 24);
        assert_eq!(one, fused);
    }

    /// A round IV for the tests.
    const IV: MaskIv = [0x1c, 0x2d, 0x3e, 0x4f, 0x50, 0x61, 0x72, 0x83, 0x94, 0xa5, 0xb6, 0xc7];

    /// The `ctr` crate's byte-level AES-128-CTR (`Ctr32BE`) stream of `seed`
    /// under `IV`, from block `first_block`, as little-endian words.
    fn reference_words(seed: &[u8; 32], first_block: u32, len: usize) -> Vec<u32> {
        use aes::cipher::StreamCipher;
        let mut iv = [0u8; 16];
        iv[..12].copy_from_slice(&IV);
        iv[12..].copy_from_slice(&first_block.to_be_bytes());
        let mut bytes = vec![0u8; len * 4];
        ctr::Ctr32BE::<aes::Aes128>::new(seed[..16].into(), (&iv).into()).apply_keystream(&mut bytes);
        bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    #[test]
    fn mask_streams_equal_the_reference_ctr_keystream_at_any_offset_and_block_size() {
        // Two streams, added and subtracted, sharing their counter blocks:
        // each must still be its own key's reference stream.
        let (a, b) = ([0x5au8; 32], [0xa5u8; 32]);
        let len = 9001;
        let (wa, wb) = (reference_words(&a, 0, len), reference_words(&b, 0, len));
        let words: Vec<u32> = wa.iter().zip(&wb).map(|(x, y)| x.wrapping_sub(*y)).collect();
        for first in [0usize, 1, 2, 3, 4, 5, 1003] {
            for step in [1usize, 2, 3, 4, 7, 4096, 5000] {
                let mut acc = vec![0u32; len - first];
                let mut m = MaskStreams::starting_at(&IV, &[(&a, false), (&b, true)], 32, first);
                for chunk in acc.chunks_mut(step) {
                    m.apply(chunk);
                    // An empty block changes nothing.
                    m.apply(&mut []);
                }
                assert_eq!(acc, words[first..], "first {first}, step {step}");
            }
        }
        // Subtraction is the inverse, and the bit mask is applied.
        let mut acc = vec![0u32; 10];
        apply_masks(&mut acc, &IV, &[(&a, true)], 20);
        let want: Vec<u32> = wa[..10].iter().map(|w| 0u32.wrapping_sub(*w) & 0xfffff).collect();
        assert_eq!(acc, want);
        // Another IV is another stream.
        let mut other = vec![0u32; 10];
        apply_masks(&mut other, &[0u8; 12], &[(&a, true)], 20);
        assert_ne!(acc, other);
    }

    // The wrap is at word 2^34.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn mask_streams_wrap_their_32_bit_counter_as_the_reference_does() {
        // A part that starts 3 blocks short of the counter's wrap, mid-block.
        let seed = [0x33u8; 32];
        let len = 64;
        let words = reference_words(&seed, u32::MAX - 2, len);
        let first = 4 * (u32::MAX as usize - 2);
        let mut acc = vec![0u32; len];
        MaskStreams::starting_at(&IV, &[(&seed, false)], 32, first).apply_all(&mut acc);
        assert_eq!(acc, words);
        let mut tail = vec![0u32; len - 17];
        MaskStreams::starting_at(&IV, &[(&seed, false)], 32, first + 17).apply_all(&mut tail);
        assert_eq!(tail, words[17..]);
    }

    #[test]
    fn split_masking_equals_one_pass() {
        // Long enough to be split across threads on a multi-core machine,
        // with a length that is not a multiple of the block or of 4.
        let len = 3 * PARALLEL_MIN_WORDS + 4099;
        let (a, b) = ([7u8; 32], [8u8; 32]);
        let masks = [(&a, false), (&b, true)];
        let mut split = vec![11u32; len];
        apply_masks(&mut split, &IV, &masks, 32);
        let mut one = vec![11u32; len];
        MaskStreams::new(&IV, &masks, 32).apply_all(&mut one);
        assert_eq!(split, one);
        // A stream started mid-vector continues the full stream exactly.
        let mut tail = vec![11u32; len - 1000];
        MaskStreams::starting_at(&IV, &masks, 32, 1000).apply_all(&mut tail);
        assert_eq!(tail, one[1000..]);
    }

    #[test]
    fn sealed_shares_bind_their_context() {
        let key = [3u8; 32];
        let (nonce, ct) = seal(&key, b"share", b"job|1|a|b", &mut OsRng).unwrap();
        assert_eq!(open(&key, &nonce, &ct, b"job|1|a|b").unwrap().as_slice(), b"share");
        assert!(open(&key, &nonce, &ct, b"job|2|a|b").is_none());
        assert!(open(&[4u8; 32], &nonce, &ct, b"job|1|a|b").is_none());
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert!(open(&key, &nonce, &bad, b"job|1|a|b").is_none());
        let (nonce2, _) = seal(&key, b"share", b"x", &mut OsRng).unwrap();
        assert_ne!(nonce, nonce2, "nonces are fresh");
    }
}
