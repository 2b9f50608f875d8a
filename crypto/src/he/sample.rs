//! Randomness for the HE layer. Secret values (keys, shares, encryption
//! masks, noise) come from [`Csprng`]: AES-128 in counter mode keyed with
//! 128 bits from the operating system, through the `aes` crate, whose key
//! schedule wipes itself when dropped, in a stream that wipes its buffered
//! output too (copies the compiler leaves on the stack excepted, as
//! anywhere `zeroize` is used). TFHE-rs's generator and block cipher keep
//! their round keys and buffered bytes in memory after use, so they serve
//! only public values ([`PublicCsprng`]: the common random polynomial from
//! its XOF mode, so every party derives the same values from the same
//! transcript); the two are separate types, so secret sampling cannot be
//! given a public generator. The counter-mode stream equals TFHE-rs's
//! AES-CTR block for block (tested), so the public linear-hash coefficients
//! are the values they were on TFHE-rs's cipher.

use rand_core::{OsRng, RngCore};
use tfhe::core_crypto::commons::ciphertext_modulus::CiphertextModulus;
use tfhe::core_crypto::commons::math::random::{DefaultRandomGenerator, RandomGenerator, XofSeed};
use zeroize::Zeroize;

use super::ring::{N, Poly, Q, from_signed};

/// Standard deviation of fresh RLWE errors (HE Standard, σ = 3.2).
pub const SIGMA: f64 = 3.2;

/// Blocks per refill: 64, so that the `aes` crate's VAES paths run (they
/// take 64 blocks at a time with AVX-512, 30 with AVX2; fewer go through
/// AES-NI one block at a time). 1 KiB of output.
const BLOCKS: usize = 64;

/// AES-128 in counter mode, 64 blocks per refill (VAES or AES-NI, picked
/// at run time by the `aes` crate), counter block `c` encrypted as
/// the 16 little-endian bytes of `c` and the key taken as the native-endian
/// bytes of a `u128`: TFHE-rs's AES-CTR convention, so the stream is its
/// keystream block for block (`the_stream_is_tfhe_rs_aes_ctr_keystream`).
/// Uses: the linear hash's public coefficients (keyed by BLAKE3 of a
/// domain and the transcript: the hash draws 3 coefficients per ciphertext
/// coefficient, 3 × 10^6 per upload, where TFHE-rs's byte-at-a-time
/// generator manages ~130 MB/s) and every secret draw ([`Csprng`]). The
/// cipher's key schedule is wiped when dropped (the `aes` crate's
/// `zeroize` feature); the buffered words and the counter here.
#[derive(zeroize::ZeroizeOnDrop)]
pub struct AesStream {
    #[zeroize(skip)]
    cipher: aes_vaes::Aes128Enc,
    counter: u128,
    words: [u64; 2 * BLOCKS],
    next: usize,
}

impl AesStream {
    /// The public stream of `transcript` under an 8-byte domain separator.
    pub fn public(transcript: &[u8], domain: [u8; 8]) -> AesStream {
        let mut h = blake3::Hasher::new_derive_key("confide he public stream v1");
        h.update(&domain);
        h.update(transcript);
        let key = h.finalize();
        let mut k = [0u8; 16];
        k.copy_from_slice(&key.as_bytes()[..16]);
        Self::from_key(&mut u128::from_ne_bytes(k))
    }

    /// A stream keyed by `key` (a secret one when the key is), which is
    /// wiped here once the key schedule is built.
    fn from_key(key: &mut u128) -> AesStream {
        use aes_vaes::cipher::KeyInit;
        let bytes = zeroize::Zeroizing::new(key.to_ne_bytes());
        key.zeroize();
        let cipher = aes_vaes::Aes128Enc::new((&*bytes).into());
        AesStream { cipher, counter: 0, words: [0; 2 * BLOCKS], next: 2 * BLOCKS }
    }

    /// A secret stream keyed with 128 bits from the operating system.
    fn from_os() -> AesStream {
        let mut seed = [0u8; 16];
        OsRng.fill_bytes(&mut seed);
        let mut key = u128::from_ne_bytes(seed);
        seed.zeroize();
        Self::from_key(&mut key)
    }

    /// The next 64 bits of the stream.
    #[inline]
    fn next_u64(&mut self) -> u64 {
        if self.next == self.words.len() {
            self.refill();
        }
        let v = self.words[self.next];
        self.next += 1;
        v
    }

    /// The next 64 blocks: counters `c..c+64` (wrapping), as eight of
    /// TFHE-rs's batches; each block's 16 bytes read as two little-endian
    /// words.
    fn refill(&mut self) {
        use aes_vaes::cipher::BlockCipherEncrypt;
        let c = self.counter;
        let mut blocks: [aes_vaes::Block; BLOCKS] =
            std::array::from_fn(|i| c.wrapping_add(i as u128).to_le_bytes().into());
        self.cipher.encrypt_blocks(&mut blocks);
        self.counter = c.wrapping_add(BLOCKS as u128);
        for (pair, block) in self.words.chunks_exact_mut(2).zip(blocks.iter_mut()) {
            for (w, b) in pair.iter_mut().zip(block.chunks_exact(8)) {
                let mut x = [0u8; 8];
                x.copy_from_slice(b);
                *w = u64::from_le_bytes(x);
                x.zeroize();
            }
            block.as_mut_slice().zeroize();
        }
        self.next = 0;
    }

    /// The next value uniform in `[0, Q)`.
    #[inline]
    pub fn next_uniform(&mut self) -> u64 {
        loop {
            let v = self.next_u64() & ((1 << 62) - 1);
            if v < Q {
                return v;
            }
        }
    }

    /// A uniform f64 in (0, 1]: 53 random bits, never 0.
    #[inline]
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Fills `out` with values uniform in `[0, Q)`.
    pub fn fill_uniform(&mut self, out: &mut [u64]) {
        for o in out {
            *o = self.next_uniform();
        }
    }

    /// Fills `out` with values uniform in {0, 1, Q − 1} (−1, 0, 1 mod Q):
    /// two bits at a time, 3 rejected, so exactly uniform.
    fn fill_ternary(&mut self, out: &mut [u64]) {
        let mut filled = 0;
        while filled < out.len() {
            let mut word = self.next_u64();
            for _ in 0..32 {
                let two = word & 3;
                word >>= 2;
                if two == 3 {
                    continue;
                }
                if let Some(o) = out.get_mut(filled) {
                    *o = [0, 1, Q - 1][two as usize];
                    filled += 1;
                }
            }
        }
    }

    /// The next 128 bits.
    fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
}

/// The generator for secrets (keys, shares, masks, noise): an
/// [`AesStream`] keyed with 128 bits from the operating system, wiped when
/// dropped. Public values come from [`PublicCsprng`], a separate type.
pub struct Csprng(AesStream);

/// The XOF of a public transcript (TFHE-rs's XOF mode) under an 8-byte
/// domain separator: every party that hashes the same transcript gets the
/// same values. It draws only uniform values, the only public ones needed.
pub struct PublicCsprng(RandomGenerator<DefaultRandomGenerator>);

impl PublicCsprng {
    /// The stream of `transcript` under `domain`.
    pub fn from_transcript(transcript: &[u8], domain: [u8; 8]) -> PublicCsprng {
        PublicCsprng(RandomGenerator::new(XofSeed::new(blake3::hash(transcript).as_bytes().to_vec(), domain)))
    }

    /// A polynomial uniform in `[0, Q)^N` (TFHE-rs's rejection sampling
    /// under a custom modulus, so exactly uniform).
    pub fn uniform(&mut self) -> Poly {
        let mut p = vec![0u64; N];
        match CiphertextModulus::<u64>::try_new(Q as u128) {
            // Q < 2^62 is a valid custom modulus (tested).
            Ok(m) => self.0.fill_slice_with_random_uniform_custom_mod(&mut p, m),
            Err(_) => unreachable!("Q is a valid modulus (tested)"),
        }
        p
    }
}

impl Csprng {
    /// Seeded with 128 bits from the operating system.
    pub fn from_os() -> Csprng {
        Csprng(AesStream::from_os())
    }

    /// A deterministic generator for known-answer tests only.
    #[cfg(test)]
    pub(crate) fn for_tests(mut seed: u128) -> Csprng {
        Csprng(AesStream::from_key(&mut seed))
    }

    /// A polynomial uniform in `[0, Q)^N` (rejection sampling, so exactly uniform).
    pub fn uniform(&mut self) -> Poly {
        let mut p = vec![0u64; N];
        self.fill_uniform(&mut p);
        p
    }

    /// Fills `out` with values uniform in `[0, Q)`.
    pub fn fill_uniform(&mut self, out: &mut [u64]) {
        self.0.fill_uniform(out);
    }

    /// A polynomial with coefficients uniform in {−1, 0, 1}.
    pub fn ternary(&mut self) -> Poly {
        let mut p = vec![0u64; N];
        self.0.fill_ternary(&mut p);
        p
    }

    /// Adds rounded Gaussian noise of standard deviation `sigma` to `p` (mod Q).
    ///
    /// Marsaglia's polar method over a secret AES-CTR stream keyed with 128
    /// bits from this generator. Like Box–Muller (TFHE-rs's own
    /// `random_gaussian`), it maps uniforms to two independent normals
    /// exactly, but with one logarithm per pair and no sine or cosine,
    /// which took a tenth of the samples in a profile of an `he` benchmark
    /// run (noise drawn ahead included); a pair is redrawn outside the
    /// unit disc (21%). The stream and its key are wiped with the call.
    pub fn add_gaussian(&mut self, p: &mut [u64], sigma: f64) {
        let mut stream = AesStream::from_key(&mut self.0.next_u128());
        let mut pair = || loop {
            // u, v uniform in (−1, 1]; kept inside the unit disc, off 0.
            let (u, v) = (2.0 * stream.unit() - 1.0, 2.0 * stream.unit() - 1.0);
            let s = u * u + v * v;
            if s < 1.0 && s > 0.0 {
                let r = sigma * (-2.0 * s.ln() / s).sqrt();
                return (r * u, r * v);
            }
        };
        let mut chunks = p.chunks_exact_mut(2);
        for two in &mut chunks {
            let (a, b) = pair();
            two[0] = super::ring::add_mod(two[0], from_signed(a.round() as i64));
            two[1] = super::ring::add_mod(two[1], from_signed(b.round() as i64));
        }
        for v in chunks.into_remainder() {
            let (a, _) = pair();
            *v = super::ring::add_mod(*v, from_signed(a.round() as i64));
        }
    }

    /// A polynomial of rounded Gaussian noise.
    pub fn gaussian(&mut self, sigma: f64) -> Poly {
        let mut p = vec![0u64; N];
        self.add_gaussian(&mut p, sigma);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::super::ring::centred;
    use super::*;

    /// The stream is TFHE-rs's AES-128-CTR keystream block for block (so
    /// the linear hash's public coefficients did not change when it moved
    /// to the wiping cipher), across a batch, keys and the counter's wrap;
    /// and FIPS-197's AES-128 example (appendix C.1) as one counter block.
    #[test]
    fn the_stream_is_tfhe_rs_aes_ctr_keystream() {
        use tfhe_csprng::generators::aes_ctr::{Aes128Key, AesBlockCipher};
        use tfhe_csprng::generators::default::DefaultAes128BlockCipher;
        for (key, start) in [(0u128, 0u128), (u128::MAX / 3, 5), (0x0123_4567_89ab_cdef << 40, u128::MAX - 9)] {
            let mut ours = AesStream::from_key(&mut key.clone());
            ours.counter = start;
            let mut theirs = DefaultAes128BlockCipher::new(Aes128Key::new(key));
            // Past one refill of 64 blocks.
            for batch in 0..10u128 {
                let c = start.wrapping_add(8 * batch);
                let bytes = theirs.generate_batch(std::array::from_fn(|i| c.wrapping_add(i as u128)));
                for chunk in bytes.chunks_exact(8) {
                    let mut x = [0u8; 8];
                    x.copy_from_slice(chunk);
                    assert_eq!(ours.next_u64(), u64::from_le_bytes(x), "key {key:#x}, counter {c:#x}");
                }
            }
        }
        let key: [u8; 16] = std::array::from_fn(|i| i as u8);
        let plaintext: [u8; 16] = std::array::from_fn(|i| (i as u8) * 0x11);
        let mut fips = AesStream::from_key(&mut u128::from_ne_bytes(key));
        fips.counter = u128::from_le_bytes(plaintext);
        let block = [fips.next_u64().to_le_bytes(), fips.next_u64().to_le_bytes()].concat();
        assert_eq!(
            block,
            [0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a]
        );
    }

    /// The secret generator's stream and its cipher are `ZeroizeOnDrop`
    /// (marker traits, checked at compile time: dropping the `aes` crate's
    /// `zeroize` feature fails here), and a key handed to a stream is wiped.
    #[test]
    fn secret_generators_are_zeroize_on_drop() {
        fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        wiped_on_drop::<AesStream>();
        wiped_on_drop::<aes_vaes::Aes128Enc>();
        let mut key = 0x0123_4567_89ab_cdef_u128;
        let _stream = AesStream::from_key(&mut key);
        assert_eq!(key, 0);
    }

    /// Secret uniform draws: below Q, reaching its top, and spread evenly
    /// over sixteen bins of [0, Q) (χ² with 15 d.o.f. below 37.7, its
    /// 0.999 quantile; 2^15 values, fixed seed).
    #[test]
    fn secret_uniform_values_are_uniform_below_q() {
        let mut g = Csprng::for_tests(4);
        let mut v = vec![0u64; 1 << 15];
        g.fill_uniform(&mut v);
        assert!(v.iter().all(|&x| x < Q) && v.iter().any(|&x| x > Q - Q / 64));
        let mut bins = [0f64; 16];
        for &x in &v {
            bins[((u128::from(x) * 16) / u128::from(Q)) as usize] += 1.0;
        }
        let e = v.len() as f64 / 16.0;
        let chi2: f64 = bins.iter().map(|&o| (o - e).powi(2) / e).sum();
        assert!(chi2 < 37.7, "χ² = {chi2}: {bins:?}");
    }

    #[test]
    fn ternary_is_balanced() {
        let mut g = Csprng::for_tests(1);
        let mut counts = [0usize; 3];
        for _ in 0..8 {
            for v in g.ternary() {
                match centred(v) {
                    -1 => counts[0] += 1,
                    0 => counts[1] += 1,
                    1 => counts[2] += 1,
                    other => panic!("ternary value {other}"),
                }
            }
        }
        // 32768 draws, expected 10923 each; χ² with 2 d.o.f. below 13.8 (p = 0.001).
        let e = 8.0 * N as f64 / 3.0;
        let chi2: f64 = counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum();
        assert!(chi2 < 13.8, "{counts:?}");
    }

    /// 2^16 values at σ = 1000 fall in eight bins cut at 0, ±0.5σ, ±σ and
    /// ±1.5σ as the normal distribution says: χ² with 7 degrees of freedom
    /// below 29.9 (its 0.9999 quantile; fixed seed). A method that skewed
    /// or scaled the values (a lost factor of √2, an absolute value) fails.
    /// The two values of a pair are uncorrelated: |r| below 5/√(pairs),
    /// five standard errors (a pair that repeated one value fails).
    #[test]
    fn gaussian_values_follow_the_normal_distribution() {
        let mut g = Csprng::for_tests(3);
        let mut p = vec![0u64; 1 << 16];
        g.add_gaussian(&mut p, 1000.0);
        let cuts = [-1500.0, -1000.0, -500.0, 0.0, 500.0, 1000.0, 1500.0];
        let mut counts = [0f64; 8];
        for &v in &p {
            let x = centred(v) as f64;
            counts[cuts.iter().filter(|&&c| x >= c).count()] += 1.0;
        }
        // Φ(−1.5), then the mass between the cuts, symmetric.
        let half = [0.066807, 0.091848, 0.149883, 0.191462];
        let expected = [half[0], half[1], half[2], half[3], half[3], half[2], half[1], half[0]];
        let n = p.len() as f64;
        let chi2: f64 = counts.iter().zip(expected).map(|(&o, e)| (o - n * e).powi(2) / (n * e)).sum();
        assert!(chi2 < 29.9, "χ² = {chi2}: {counts:?}");
        let pairs: Vec<(f64, f64)> = p.chunks_exact(2).map(|t| (centred(t[0]) as f64, centred(t[1]) as f64)).collect();
        let m = pairs.len() as f64;
        let (sx, sy) = pairs.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let (mx, my) = (sx / m, sy / m);
        let cov: f64 = pairs.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>() / m;
        let vx: f64 = pairs.iter().map(|(x, _)| (x - mx).powi(2)).sum::<f64>() / m;
        let vy: f64 = pairs.iter().map(|(_, y)| (y - my).powi(2)).sum::<f64>() / m;
        let r = cov / (vx * vy).sqrt();
        assert!(r.abs() < 5.0 / m.sqrt(), "correlation within pairs {r}");
    }

    #[test]
    fn gaussian_has_its_sigma_and_signs_map_mod_q() {
        let mut g = Csprng::for_tests(2);
        let p = g.gaussian(1000.0);
        let vals: Vec<f64> = p.iter().map(|&v| centred(v) as f64).collect();
        let mean = vals.iter().sum::<f64>() / N as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / N as f64;
        // 4096 samples: the sample std is within 5% of σ with overwhelming probability.
        assert!((var.sqrt() / 1000.0 - 1.0).abs() < 0.05, "std {}", var.sqrt());
        assert!(vals.iter().any(|&v| v < 0.0) && vals.iter().all(|v| v.abs() < 8000.0));
    }

    #[test]
    fn uniform_is_below_q_and_transcripts_are_reproducible() {
        let a = PublicCsprng::from_transcript(b"job 1 round 2", *b"CnfdTest").uniform();
        let b = PublicCsprng::from_transcript(b"job 1 round 2", *b"CnfdTest").uniform();
        let c = PublicCsprng::from_transcript(b"job 1 round 3", *b"CnfdTest").uniform();
        let d = PublicCsprng::from_transcript(b"job 1 round 2", *b"CnfdOthr").uniform();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert!(a.iter().all(|&v| v < Q));
        // Top bits used: values reach the upper half of [0, Q).
        assert!(a.iter().any(|&v| v > Q / 2));
        assert_ne!(Csprng::from_os().uniform(), Csprng::from_os().uniform());
    }
}
