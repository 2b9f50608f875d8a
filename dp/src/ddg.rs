//! The distributed discrete Gaussian mechanism (Kairouz, Liu and Steinke,
//! "The Distributed Discrete Gaussian Mechanism for Federated Learning with
//! Secure Aggregation", ICML 2021), as its authors' code implements it.
//!
//! Each party, for a vector x ∈ R^d:
//! 1. pads x to d' = 2^⌈log₂ d⌉ and rotates it: a Rademacher diagonal from a
//!    seed every party shares, then the normalised Walsh–Hadamard transform
//!    (orthonormal, so the L2 norm is kept; it flattens the vector so that
//!    rounding and the modular wrap-around behave);
//! 2. clips it to L2 norm c and scales it by s = 1/γ;
//! 3. rounds it to integers at random (⌊v⌋ + Bernoulli(v − ⌊v⌋)), again
//!    until the *integer* norm² is at most a bound fixed in advance
//!    (conditional randomized rounding: the bound is what the privacy
//!    analysis uses, and it is checked exactly in integers);
//! 4. adds discrete Gaussian noise N_Z(0, σ²) per coordinate, σ an integer
//!    (its own exact sampler, [`crate::sampler`]), and
//! 5. writes the result modulo 2^b: the words secure aggregation sums.
//!
//! The coordinator sees only the modular sum. Decoding re-centres it,
//! divides by s and undoes the rotation. The noise is calibrated so that
//! the *honest* survivors' noise alone gives the stated ε: colluding
//! parties can subtract their own.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rayon::iter::{IndexedParallelIterator as _, ParallelIterator as _};
use rayon::slice::ParallelSliceMut as _;
use serde::{Deserialize, Serialize};

use zeroize::Zeroizing;

use crate::Error;
use crate::sampler::DiscreteGaussian;

/// The largest integer noise σ the sampler takes.
const MAX_SIGMA: f64 = (1u64 << 26) as f64;

/// Conditional rounding retries before giving up (the authors' code: 1,000).
const MAX_ROUNDING_TRIES: usize = 1000;

/// What a job fixes for the mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdgConfig {
    /// c: every party's vector is clipped to this L2 norm.
    pub clip: f64,
    /// z: the honest parties' noise together has standard deviation z·c.
    pub noise_multiplier: f64,
    /// d: values per vector.
    pub dim: usize,
    /// b: bits of the modulus the sum lives in (2..=32).
    pub bits: u32,
    /// The most parties whose vectors are summed (the wrap-around budget).
    pub max_parties: usize,
    /// The fewest honest parties whose noise is in the sum (the noise
    /// calibration): the round's minimum survivors less the corrupt ones.
    /// Each party derives it from the spec it accepted and the threat model
    /// of `docs/secure-aggregation.md`, never from the coordinator: a smaller
    /// σ for everyone follows from a larger value here.
    pub honest_parties: usize,
    /// β ∈ [0, 1): conditional rounding (0 = plain randomized rounding; the
    /// paper recommends e^{−1/2}).
    pub beta: f64,
    /// k: standard deviations of the noisy sum kept inside the modulus.
    pub k_stddevs: f64,
}

/// Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, NeurIPS 2021)
/// under distributed noise: each party appends (b − ½)·κ to its update,
/// b = 1 when its update's norm is within the round's clip C, and the whole
/// vector goes through the mechanism with the joint clip C' = √(C² + κ²/4)
/// and multiplier z. The count of unclipped updates then comes out of the
/// same noisy sum with noise σ_b = z·C'/κ. Every vector is within C' of
/// zero, but a party with no data sends (0, +κ/2), so party-level ε is
/// accounted at twice the sensitivity (`confide_proto::dpspec::Sensitivity`).
/// The next round's clip moves geometrically toward the target quantile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// γ: the fraction of updates the clip should leave whole.
    pub target_quantile: f64,
    /// η: C ← C·exp(−η·(b̄ − γ)).
    pub learning_rate: f64,
    /// σ_b: the noise on the count of unclipped updates, in counts. More
    /// than z/2: the rest of the noise budget protects the updates.
    pub count_stddev: f64,
}

impl AdaptiveClip {
    /// (C', κ) for round clip `clip` at noise multiplier `z`, or `None` when
    /// σ_b ≤ z/2 leaves nothing for the updates.
    pub fn joint(&self, clip: f64, z: f64) -> Option<(f64, f64)> {
        let rest = 1.0 - z * z / (4.0 * self.count_stddev * self.count_stddev);
        // A negative σ_b squares to a valid one, but would make κ negative.
        if !(rest > 0.0 && self.count_stddev > 0.0 && clip > 0.0 && clip.is_finite()) {
            return None;
        }
        let joint = clip / rest.sqrt();
        Some((joint, z * joint / self.count_stddev))
    }

    /// How far (a factor either way) a clip may move from the first one:
    /// parties refuse a round clip beyond it, and the coordinator never
    /// moves it there.
    pub const RANGE: f64 = 1_048_576.0;

    /// Whether `clip` is within [`AdaptiveClip::RANGE`] of `first`.
    pub fn in_range(first: f64, clip: f64) -> bool {
        clip.is_finite() && clip >= first / Self::RANGE && clip <= first * Self::RANGE
    }

    /// The next round's clip, from this round's noisy count of unclipped
    /// updates among `contributors`, kept within range of `first`.
    pub fn next_clip(&self, first: f64, clip: f64, unclipped: f64, contributors: usize) -> f64 {
        let fraction = if contributors == 0 { self.target_quantile } else { unclipped / contributors as f64 };
        let fraction = if fraction.is_finite() { fraction.clamp(0.0, 1.0) } else { self.target_quantile };
        let next = clip * (-self.learning_rate * (fraction - self.target_quantile)).exp();
        next.clamp(first / Self::RANGE, first * Self::RANGE)
    }
}

/// The mechanism, calibrated.
#[derive(Debug, Clone)]
pub struct Ddg {
    cfg: DdgConfig,
    padded: usize,
    scale: f64,
    local_sigma: u32,
    /// s·Δ̃₂: the paper's norm bound after rounding, in lattice units. The
    /// accounting uses it as the L2 sensitivity.
    bound: f64,
    /// ⌊(s·Δ̃₂)²⌋: the integer norm² every rounded vector is checked
    /// against, exactly, so that no vector exceeds the sensitivity.
    bound_sq: u128,
    noise: DiscreteGaussian,
}

impl Ddg {
    /// Calibrates the scale and the integer noise for `cfg` (the authors'
    /// heuristic scale: k standard deviations of the noisy sum of
    /// `max_parties` vectors fit the 2^b modulus).
    pub fn new(cfg: DdgConfig) -> Result<Ddg, Error> {
        let Calibration { padded, scale, local_sigma, bound, bound_sq } = Calibration::of(&cfg)?;
        let noise = DiscreteGaussian::with_sigma(local_sigma)?;
        Ok(Ddg { cfg, padded, scale, local_sigma, bound, bound_sq, noise })
    }

    /// The configuration.
    pub fn config(&self) -> &DdgConfig {
        &self.cfg
    }

    /// s = 1/γ: lattice points per unit.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Each party's noise σ, in lattice units.
    pub fn local_sigma(&self) -> u32 {
        self.local_sigma
    }

    /// d': the rotated (padded) length.
    pub fn padded_dim(&self) -> usize {
        self.padded
    }

    /// d' for a vector of `dim` values: the next power of two up to
    /// [`ROTATION_BLOCK`], a multiple of it above.
    pub fn padded_dim_for(dim: usize) -> usize {
        if dim <= ROTATION_BLOCK { dim.next_power_of_two() } else { dim.div_ceil(ROTATION_BLOCK) * ROTATION_BLOCK }
    }

    /// The length of each block the rotation transforms on its own.
    fn block(&self) -> usize {
        rotation_block_of(self.padded)
    }

    /// Δ₂ in lattice units: the paper's bound s·Δ̃₂. Every vector's integer
    /// norm² is checked against ⌊(s·Δ̃₂)²⌋, so none exceeds it.
    pub fn l2_sensitivity(&self) -> f64 {
        self.bound
    }

    /// Δ₁ in lattice units: at most √d'·Δ₂, and at most Δ₂² for integers.
    pub fn l1_sensitivity(&self) -> f64 {
        self.calibration().l1()
    }

    /// The accountant's event for one round.
    pub fn event(&self) -> crate::rdp::DpEvent {
        self.calibration().event(self.cfg.honest_parties)
    }

    fn calibration(&self) -> Calibration {
        let Ddg { padded, scale, local_sigma, bound, bound_sq, .. } = *self;
        Calibration { padded, scale, local_sigma, bound, bound_sq }
    }

    /// One party's noise vector, drawn ahead of the round (it does not
    /// depend on the data).
    pub fn sample_noise(&self) -> Result<DdgNoise, Error> {
        let mut noise = Zeroizing::new(vec![0i64; self.padded]);
        self.noise.fill(&mut noise)?;
        // Kept modulo 2^b (its residue is all the words carry): half the
        // memory of i64, and the encoding turns it into the words in place.
        let mask = self.word_mask();
        let residues = Zeroizing::new(noise.iter().map(|&e| e as u32 & mask).collect());
        Ok(DdgNoise(residues, self.local_sigma, self.cfg.bits))
    }

    /// 2^b − 1: the words' bits.
    fn word_mask(&self) -> u32 {
        u32::MAX >> (32 - self.cfg.bits)
    }

    /// Rotates, clips, scales and rounds `x` (length d): the integer vector
    /// before noise, with its norm² checked against the bound.
    pub fn quantize<R: CryptoRng + ?Sized>(
        &self,
        x: &[f32],
        rotation_seed: &[u8; 32],
        rng: &mut R,
    ) -> Result<Zeroizing<Vec<i64>>, Error> {
        self.check_length(x)?;
        let rotated = self.rotated(&mut CopyIn(x), rotation_seed)?;
        let mut out = Zeroizing::new(vec![0i64; self.padded]);
        // A failed attempt is overwritten by the next.
        self.round(&rotated, rng, |at, r, undo| {
            if !undo {
                out[at..at + r.len()].copy_from_slice(r);
            }
        })?;
        Ok(out)
    }

    /// The vector the source writes (d values, into the rotation's buffer,
    /// block by block) times its scale, rotated, with the factor that
    /// scales, clips and puts it onto the lattice (applied as it is
    /// rounded: the transform is linear).
    fn rotated(&self, source: &mut impl Source, rotation_seed: &[u8; 32]) -> Result<Prepared, Error> {
        // The rotated and rounded vectors are the update in other words:
        // wiped when dropped, also when the source fails part-way. The
        // padding holds zeros (the kept buffer does between uses).
        let mut v = Rotated::zeros(self.padded);
        let (written_sq, scale) = rotate_in_blocks(&mut v, self.cfg.dim, source, rotation_seed)?;
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(Error::InvalidInput(format!("the source's scale is {scale}")));
        }
        // The rotation is orthonormal, so the norm is the input's (the
        // written values', times the scale).
        if !written_sq.is_finite() {
            return Err(Error::InvalidInput("vector has NaN or infinite values".into()));
        }
        let norm = written_sq.sqrt() * scale;
        // Clipped a hair inside the norm: the f32 rotation moves the norm
        // by a few 2^-24 of itself, which on the largest lattices (many
        // steps per coordinate) is more than the rounding bound's slack,
        // so a vector clipped exactly to the norm would fail every
        // rounding attempt.
        let limit = self.cfg.clip * (1.0 - CLIP_MARGIN);
        let clip = if norm > limit { limit / norm } else { 1.0 };
        // Each block's transform is orthonormal once divided by √(its length).
        Ok(Prepared { v, factor: self.scale * scale * clip / (self.block() as f64).sqrt() })
    }

    /// Conditional randomized rounding of the `rotated` vector (times its
    /// factor): attempts, each with coins from a fresh seed drawn from
    /// `rng`, handing each chunk of integers to `sink(first index, values,
    /// false)`, until the exact integer norm² is within the bound. After a
    /// failed attempt the sink is handed the same integers again with
    /// `true` (the same coins, from the same seed), so a sink that
    /// accumulates in place can take them back out.
    fn round<R: CryptoRng + ?Sized>(
        &self,
        rotated: &Prepared,
        rng: &mut R,
        mut sink: impl FnMut(usize, &[i64], bool),
    ) -> Result<(), Error> {
        let mut buffers = RoundingBuffers::new();
        for _ in 0..MAX_ROUNDING_TRIES {
            let mut coin_seed = Zeroizing::new([0u8; 32]);
            rng.fill_bytes(&mut *coin_seed);
            let norm_sq = round_once(rotated, &coin_seed, &mut buffers, &mut |at, r| sink(at, r, false));
            if norm_sq <= self.bound_sq {
                return Ok(());
            }
            round_once(rotated, &coin_seed, &mut buffers, &mut |at, r| sink(at, r, true));
        }
        Err(Error::InvalidInput(format!(
            "conditional rounding failed {MAX_ROUNDING_TRIES} times (β = {} too small for this vector)",
            self.cfg.beta
        )))
    }

    /// One party's words: `quantize(x)` plus `noise` (from
    /// [`Ddg::sample_noise`], consumed: noise used twice cancels in the
    /// difference of two sums), modulo 2^b. The words are for secure
    /// aggregation to mask in place; the caller wipes what it keeps.
    pub fn encode<R: CryptoRng + ?Sized>(
        &self,
        x: &[f32],
        noise: DdgNoise,
        rotation_seed: &[u8; 32],
        rng: &mut R,
    ) -> Result<Vec<u32>, Error> {
        self.check_length(x)?;
        self.encode_from(&mut CopyIn(x), noise, rotation_seed, rng)
    }

    fn check_length(&self, x: &[f32]) -> Result<(), Error> {
        if x.len() != self.cfg.dim {
            return Err(Error::InvalidInput(format!(
                "vector of {} values; the mechanism takes {}",
                x.len(),
                self.cfg.dim
            )));
        }
        Ok(())
    }

    /// [`Ddg::encode`] of the vector a [`Source`] writes, a block at a time,
    /// straight into the rotation's own buffer while the block is in cache
    /// (no copy of a vector the caller builds anyway, and no pass of its
    /// own), then scales. An error from the source is returned as is.
    pub fn encode_from<R: CryptoRng + ?Sized>(
        &self,
        source: &mut impl Source,
        noise: DdgNoise,
        rotation_seed: &[u8; 32],
        rng: &mut R,
    ) -> Result<Vec<u32>, Error> {
        if noise.0.len() != self.padded {
            return Err(Error::InvalidInput(format!("{} noise values for {} coordinates", noise.0.len(), self.padded)));
        }
        // Noise drawn at another σ (another mechanism) would change the
        // guarantee, and noise kept modulo fewer bits would be off-centre
        // here. (Zero noise is for this module's tests only.)
        if noise.1 != self.local_sigma && !(cfg!(test) && noise.1 == 0) {
            return Err(Error::InvalidInput(format!(
                "noise drawn at σ = {}; this mechanism's is {}",
                noise.1, self.local_sigma
            )));
        }
        if noise.2 != self.cfg.bits && !(cfg!(test) && noise.1 == 0) {
            return Err(Error::InvalidInput(format!(
                "noise kept modulo 2^{}; this mechanism's words have {} bits",
                noise.2, self.cfg.bits
            )));
        }
        let rotated = self.rotated(source, rotation_seed)?;
        // The noise (mod 2^b) becomes the words in place: each rounded value
        // is added to its noise modulo 2^b (two's complement), so the sum
        // of the words is the sum's residue. No fresh 4 MB to fault in, and
        // half the memory traffic. A failed rounding attempt subtracts its
        // integers again, leaving the noise as it was. Wiped if the rounding
        // fails (handed over whole otherwise).
        let mask = self.word_mask();
        let mut words = noise.0;
        self.round(&rotated, rng, |at, r, undo| {
            Loop::AddRounded(&mut words[at..at + r.len()], r, mask, undo).run();
        })?;
        Ok(std::mem::take(&mut *words))
    }

    /// The sum of the parties' vectors (clipped, plus noise) from the
    /// modular sum of their words.
    pub fn decode(&self, sum: &[u32], rotation_seed: &[u8; 32]) -> Result<Vec<f64>, Error> {
        let mut out = vec![0.0; self.cfg.dim];
        self.decode_with(sum, rotation_seed, |at, values| out[at..at + values.len()].copy_from_slice(values))?;
        Ok(out)
    }

    /// [`Ddg::decode`], handing the d values to `sink(first index, values)`
    /// in consecutive chunks, so a caller can place them where it needs
    /// them without a copy of the whole vector.
    ///
    /// The words are centred into the thread's decoding buffer (the b-bit
    /// residues sign-extended), transformed, and each chunk's signs and
    /// scale applied as it is handed over; the loops are compiled for the
    /// CPU's widest vector instructions, as the encoding's are.
    pub fn decode_with(
        &self,
        sum: &[u32],
        rotation_seed: &[u8; 32],
        mut sink: impl FnMut(usize, &[f64]),
    ) -> Result<(), Error> {
        if sum.len() != self.padded {
            return Err(Error::InvalidInput(format!("a sum of {} words for {} coordinates", sum.len(), self.padded)));
        }
        let mut v = Rotated::zeros(self.padded);
        // D·H·v / (s·√B) block by block: H is symmetric, so this undoes the
        // rotation.
        let bits = self.cfg.bits;
        fwht_with(&mut v, |at, block| {
            Loop::Centre(&sum[at..at + block.len()], block, bits).run();
        });
        let factor = 1.0 / (self.scale * (self.block() as f64).sqrt());
        let mut signs = ChaCha20Rng::from_seed(*rotation_seed);
        // Chunks of whole sign words (64 values each), in order.
        for (c, chunk) in v[..self.cfg.dim].chunks_mut(DECODE_BLOCK).enumerate() {
            Loop::SignsAndScale(chunk, &mut signs, factor).run();
            sink(c * DECODE_BLOCK, chunk);
        }
        Ok(())
    }
}

/// The largest clip in lattice units (c·s) the rounding takes: 2^45, so
/// that every rounded integer is at most 2^46 + 1 in magnitude, which the
/// rounding's conversion ([`TO_INT`], below 2^51) and its exact norm² (23-bit
/// halves, [`round_chunk`]) need.
const MAX_LATTICE_NORM: f64 = (1u64 << 45) as f64;

/// How far inside the clip norm the rotation's input is scaled (2^-16 of
/// it): room for the f32 rotation's error, which moves the norm by a few
/// 2^-24 of itself (`clipped_vectors_encode_on_the_largest_lattices`:
/// without the margin, vectors clipped exactly fail every rounding attempt
/// there). The signal lost is 2^-16 of a clipped update's norm.
const CLIP_MARGIN: f64 = 1.0 / 65_536.0;

/// Rounding coins are drawn this many at a time.
const ROUNDING_CHUNK: usize = 4096;

/// The mechanism's numbers for a configuration: what [`Ddg::new`] uses and
/// what the accountant needs, without building the sampler.
#[derive(Debug, Clone, Copy)]
struct Calibration {
    padded: usize,
    scale: f64,
    local_sigma: u32,
    bound: f64,
    bound_sq: u128,
}

impl Calibration {
    fn of(cfg: &DdgConfig) -> Result<Calibration, Error> {
        let bad = |field: &str, why: String| Err(Error::InvalidInput(format!("{field}: {why}")));
        // (An adaptive clip may go down to the smallest stated clip over
        // the adaptive range.)
        let least = crate::MIN_ROUND_CLIP;
        if !(cfg.clip.is_finite() && cfg.clip >= least) {
            return bad("clip", format!("must be finite and at least {least:e} (got {})", cfg.clip));
        }
        if !(cfg.noise_multiplier.is_finite() && cfg.noise_multiplier > 0.0) {
            return bad("noise_multiplier", format!("must be positive and finite (got {})", cfg.noise_multiplier));
        }
        if cfg.dim == 0 || cfg.dim > 1 << 30 {
            return bad("dim", format!("must be 1..=2^30 (got {})", cfg.dim));
        }
        if !(2..=32).contains(&cfg.bits) {
            return bad("bits", format!("must be 2..=32 (got {})", cfg.bits));
        }
        if cfg.honest_parties == 0 || cfg.honest_parties > cfg.max_parties {
            return bad(
                "honest_parties",
                format!("must be 1..=max_parties ({}) (got {})", cfg.max_parties, cfg.honest_parties),
            );
        }
        if !(0.0..1.0).contains(&cfg.beta) {
            return bad("beta", format!("must be in [0, 1) (got {})", cfg.beta));
        }
        if !(cfg.k_stddevs.is_finite() && cfg.k_stddevs > 0.0) {
            return bad("k_stddevs", format!("must be positive (got {})", cfg.k_stddevs));
        }
        let padded = Ddg::padded_dim_for(cfg.dim);
        // The rotation flattens each block on its own: a clipped vector
        // spread over one block is what the modulus must fit.
        let block = rotation_block_of(padded);
        let (n, c, k) = (cfg.max_parties as f64, cfg.clip, cfg.k_stddevs);
        if !(c * c * n * n).is_finite() {
            return bad("clip", format!("{c} is too large to calibrate for {} parties", cfg.max_parties));
        }
        // Computed in units of the clip (c = 1), where c cancels: σ, c·s and
        // the rounding's bound, what the accountant's event is made of, are
        // then the same bits at every clip. Computed with c, they agree only
        // to rounding, and σ's ceiling could come out one step lower at a
        // round's adaptive clip than at the clip the ledger was charged at.
        let unit_stddev = cfg.noise_multiplier / (cfg.honest_parties as f64).sqrt();
        let room = 2f64.powi(2 * cfg.bits as i32) - n * k * k;
        if room <= 0.0 {
            return bad("bits", format!("{} bits are too few for {} parties at k = {k}", cfg.bits, cfg.max_parties));
        }
        // c·s: lattice steps per clip.
        let mut cs = room.sqrt() / (2.0 * k * (n * n / block as f64 + n * unit_stddev * unit_stddev).sqrt());
        // The sampler's integer σ is at most 2^26: past that, a finer lattice
        // gains nothing (the rounding is already 10^-8 of the noise).
        cs = cs.min(MAX_SIGMA / unit_stddev);
        let local_sigma = (unit_stddev * cs).ceil();
        if local_sigma < 1.0 {
            return bad("bits", format!("{} bits leave no room for the noise at this scale", cfg.bits));
        }
        let scale = cs / c;
        // Rounding inflates the norm (Theorem 1 / Prop. 22, lattice units).
        let root_d = (padded as f64).sqrt();
        // No coordinate of a clipped vector exceeds c·s: the rounding's
        // integer arithmetic needs it below 2^45 (see MAX_LATTICE_NORM).
        // Only a near-zero k or noise multiplier asks for a lattice that
        // fine.
        if cs >= MAX_LATTICE_NORM {
            return bad(
                "k_stddevs",
                format!(
                    "the clip is {cs:.3e} lattice steps at this calibration (at most 2^45): \
                     raise k_stddevs or noise_multiplier"
                ),
            );
        }
        let mut bound = cs + root_d;
        if cfg.beta > 0.0 {
            let sq = cs * cs + 0.25 * padded as f64 + (2.0 * (1.0 / cfg.beta).ln()).sqrt() * (cs + 0.5 * root_d);
            bound = bound.min(sq.sqrt());
        }
        let bound_sq = (bound * bound).floor() as u128;
        Ok(Calibration { padded, scale, local_sigma: local_sigma as u32, bound, bound_sq })
    }

    fn l1(&self) -> f64 {
        self.bound * (self.padded as f64).sqrt().min(self.bound)
    }

    fn event(&self, honest_parties: usize) -> crate::rdp::DpEvent {
        let sigma = f64::from(self.local_sigma);
        let norm = (honest_parties as f64).sqrt() * sigma;
        crate::rdp::DpEvent::DistributedDiscreteGaussian {
            l1_scale: self.l1() / norm,
            l2_scale: self.bound / norm,
            tau: tau(sigma, honest_parties),
            dim: self.padded as u64,
        }
    }
}

/// The largest rotated length the mechanism is accounted for (2^26, the
/// default limit on a model's values).
pub const MAX_PADDED_DIM: usize = 1 << 26;

/// The accountant's events of one round at every rotated length a model of
/// at most `max_dim` values can have, `cfg.dim` aside: a bound that holds
/// whatever size the model turns out to have, computed from the job spec
/// alone (before anyone has seen a model). Compose them with
/// [`crate::rdp::RdpAccountant::compose_worst`].
///
/// The lengths are 1, 2, 4, … up to [`ROTATION_BLOCK`], and above it the
/// multiples of the block, of which only the largest: from one block on,
/// the scale and σ no longer depend on the length (the calibration's
/// signal term is per block), and the sensitivities and τ·d' only grow
/// with it, so every order's RDP does (tested).
pub fn events_up_to(cfg: &DdgConfig, max_dim: usize) -> Result<Vec<crate::rdp::DpEvent>, Error> {
    if max_dim == 0 || max_dim > MAX_PADDED_DIM {
        return Err(Error::InvalidInput(format!("dim: must be 1..={MAX_PADDED_DIM} (got {max_dim})")));
    }
    let top = Ddg::padded_dim_for(max_dim);
    let mut events = Vec::new();
    let mut d = 1;
    while d <= top.min(ROTATION_BLOCK) {
        events.push(Calibration::of(&DdgConfig { dim: d, ..*cfg })?.event(cfg.honest_parties));
        d *= 2;
    }
    if top > ROTATION_BLOCK {
        events.push(Calibration::of(&DdgConfig { dim: top, ..*cfg })?.event(cfg.honest_parties));
    }
    Ok(events)
}

/// One party's noise for one round: drawn by [`Ddg::sample_noise`], used
/// once by [`Ddg::encode`] (which takes it by value), wiped when dropped.
pub struct DdgNoise(Zeroizing<Vec<u32>>, u32, u32);

impl DdgNoise {
    /// Its length (the rotated dimension it was drawn for).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The σ it was drawn at, in lattice units.
    pub fn sigma(&self) -> u32 {
        self.1
    }

    /// b: it is kept modulo 2^b, for words of b bits.
    pub fn bits(&self) -> u32 {
        self.2
    }

    /// Whether it is empty (never, for a drawn one).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// No noise, for tests of the encoding alone.
    #[cfg(test)]
    fn zero(len: usize) -> DdgNoise {
        DdgNoise(Zeroizing::new(vec![0; len]), 0, 0)
    }
}

/// τ of the paper's Theorem 1: how far a sum of n discrete Gaussians (each
/// σ) is from one discrete Gaussian, as the authors' code computes it.
pub fn tau(sigma: f64, n: usize) -> f64 {
    let mut t = 0.0;
    for k in 1..n {
        let k = k as f64;
        t += (-2.0 * (std::f64::consts::PI * sigma).powi(2) * (k / (k + 1.0))).exp();
    }
    10.0 * t
}

/// RDP at order α of the (distributed) discrete Gaussian: the paper's
/// Proposition 14, with sensitivities scaled by the total honest noise.
pub fn ddg_rdp(alpha: f64, l1_scale: f64, l2_scale: f64, tau: f64, dim: u64) -> f64 {
    let d = dim as f64;
    let t1 = alpha / 2.0 * l2_scale * l2_scale + tau * d;
    let t2 = alpha / 2.0 * (l2_scale * l2_scale + 2.0 * l1_scale * tau + tau * tau * d);
    let t3 = alpha / 2.0 * (l2_scale + d.sqrt() * tau).powi(2);
    t1.min(t2).min(t3)
}

thread_local! {
    /// The buffer [`Rotated`] lends to the encoding, kept between
    /// encodings on a thread: a party encodes every round on its job's
    /// thread, and a fresh 4 MB allocation (2^20 values) costs a page fault
    /// per 4 KiB page on its first write, about a third of an encoding's
    /// time. It holds zeros between uses, and at most
    /// [`KEPT_ROTATION_VALUES`].
    static ENCODING_BUFFER: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The same for the decoding's f64 (the coordinator's, once a round).
    static DECODING_BUFFER: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The transform's levels h, 2h, 4h and 8h at once, one vector register
/// of each of the sixteen runs h apart at a time: loaded, transformed in
/// registers and stored, so each value is loaded and stored once for four
/// levels (twice for [`radix4`]), inside a block in the L1 cache
/// ([`RADIX16_MAX_BYTES`]). The butterflies are [`radix2`]'s, in its
/// order: the results are the same bits.
macro_rules! radix16_in_registers {
    ($simd:ident, $v:ident, $h:ident, $lanes:ident, $as_simd:ident, $add:ident, $sub:ident) => {{
        let lanes = S::$lanes;
        if $h % lanes != 0 {
            // Runs shorter than a register (the scalar fallback's are
            // one value): the butterflies one level at a time.
            for level in 0..4 {
                radix2($v, $h << level);
            }
            return;
        }
        let runs = $h / lanes;
        let (regs, _) = S::$as_simd($v);
        for block in regs.chunks_exact_mut(16 * runs) {
            for j in 0..runs {
                let mut x = [block[j]; 16];
                for (m, r) in x.iter_mut().enumerate() {
                    *r = block[m * runs + j];
                }
                let mut span = 1;
                while span < 16 {
                    for m in 0..16 {
                        if m & span == 0 {
                            let (a, b) = (x[m], x[m + span]);
                            x[m] = $simd.$add(a, b);
                            x[m + span] = $simd.$sub(a, b);
                        }
                    }
                    span *= 2;
                }
                for (m, r) in x.iter().enumerate() {
                    block[m * runs + j] = *r;
                }
            }
        }
    }};
}

/// The rotation's floating-point types: f32 in the encoding and f64 in the
/// decoding. The encoding's rotation in f32 moves half the bytes of f64
/// through memory, which bounds it; its rounding error (about 2^-22 of a
/// coordinate after a block's 14 levels) is far below one lattice
/// step's randomized rounding, let alone the noise, and privacy does not
/// rest on it: the rounded integers' norm is checked exactly.
trait Real:
    Copy + Default + std::ops::Add<Output = Self> + std::ops::Sub<Output = Self> + zeroize::Zeroize + 'static
{
    /// This value, negated when `bit` is 1 (its sign bit flipped: exact).
    fn negated_if(self, bit: u64) -> Self;
    /// The thread's kept buffer of this type.
    fn kept() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Self>>>;
    /// Levels h..16h of the transform ([`radix16_in_registers`]), `v` a
    /// multiple of 16h long.
    fn radix16<S: pulp::Simd>(simd: S, v: &mut [Self], h: usize);
}

impl Real for f32 {
    #[inline(always)]
    fn negated_if(self, bit: u64) -> Self {
        f32::from_bits(self.to_bits() ^ ((bit as u32) << 31))
    }
    fn kept() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Self>>> {
        &ENCODING_BUFFER
    }
    #[inline(always)]
    fn radix16<S: pulp::Simd>(simd: S, v: &mut [Self], h: usize) {
        radix16_in_registers!(simd, v, h, F32_LANES, as_mut_simd_f32s, add_f32s, sub_f32s)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn negated_if(self, bit: u64) -> Self {
        f64::from_bits(self.to_bits() ^ (bit << 63))
    }
    fn kept() -> &'static std::thread::LocalKey<std::cell::RefCell<Vec<Self>>> {
        &DECODING_BUFFER
    }
    #[inline(always)]
    fn radix16<S: pulp::Simd>(simd: S, v: &mut [Self], h: usize) {
        radix16_in_registers!(simd, v, h, F64_LANES, as_mut_simd_f64s, add_f64s, sub_f64s)
    }
}

/// A rotated vector in this thread's reusable buffer: wiped, then handed
/// back to the thread, when dropped.
struct Rotated<T: Real>(Vec<T>);

impl<T: Real> Rotated<T> {
    /// `len` zeros, in the thread's buffer when it is free.
    fn zeros(len: usize) -> Rotated<T> {
        let mut v = T::kept()
            .try_with(|b| b.try_borrow_mut().map(|mut slot| std::mem::take(&mut *slot)).unwrap_or_default())
            .unwrap_or_default();
        // The kept buffer holds zeros (only `drop` puts it back, wiped): no
        // need to write them again.
        v.truncate(len);
        v.resize(len, T::default());
        Rotated(v)
    }
}

impl<T: Real> std::ops::Deref for Rotated<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Real> std::ops::DerefMut for Rotated<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: Real> Drop for Rotated<T> {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        let mut v = std::mem::take(&mut self.0);
        let _ = T::kept().try_with(|b| {
            // A larger model's buffer is not kept: a thread keeps at most
            // 8 MiB of f32 and 16 MiB of f64 after a job.
            if let Ok(mut slot) = b.try_borrow_mut()
                && v.capacity() <= KEPT_ROTATION_VALUES
                && slot.capacity() < v.capacity()
            {
                // Kept: zeros written by a plain (vectorised) fill, which
                // the compiler cannot drop, since the buffer is read again
                // by its next user; the length stays, and the buffer holds
                // zeros until then.
                v.fill(T::default());
                v.spare_capacity_mut().zeroize();
                *slot = std::mem::take(&mut v);
            }
        });
        // Freed (not kept): wiped by volatile writes, which the compiler
        // keeps before the free. (Empty when kept.)
        v.zeroize();
    }
}

/// The largest rotation buffer a thread keeps between uses (2^21 values:
/// 8 MiB for the encoding, 16 MiB for the decoding): models up to 2
/// million values.
const KEPT_ROTATION_VALUES: usize = 1 << 21;

/// The signs of the rotation's diagonal D, 64 per ChaCha20 word, from the
/// shared seed.
#[cfg(test)]
struct SignStream {
    rng: ChaCha20Rng,
    word: u64,
    left: u32,
}

#[cfg(test)]
impl SignStream {
    fn new(seed: &[u8; 32]) -> Self {
        SignStream { rng: ChaCha20Rng::from_seed(*seed), word: 0, left: 0 }
    }

    fn next_negative(&mut self) -> bool {
        if self.left == 0 {
            self.word = self.rng.next_u64();
            self.left = 64;
        }
        let bit = self.word & 1 == 1;
        self.word >>= 1;
        self.left -= 1;
        bit
    }
}

/// A vector the encoding writes block by block into its rotation buffer,
/// so that a caller's vector (an update: two models' difference) is formed
/// there, in cache, instead of in a copy of its own.
pub trait Source {
    /// Writes values `at..at + out.len()` of the d: consecutive blocks, in
    /// order from 0 (from 0 again after [`Source::scale`] gives `None`).
    /// `out` holds zeros on entry.
    fn write(&mut self, at: usize, out: &mut [f32]) -> Result<(), Error>;

    /// After the last block: the factor every written value is to be
    /// multiplied by (finite, at least 0; applied exactly, with the
    /// clipping, as the values are rounded), or `None` to have every block
    /// written again from the start, once. A source that learns only at
    /// the end what it must send (a norm, a diverged model) needs no pass
    /// of its own before the first block.
    fn scale(&mut self) -> Option<f64> {
        Some(1.0)
    }
}

/// `x` as it is (`x` checked to hold the mechanism's d values first:
/// [`Ddg::check_length`]).
struct CopyIn<'a>(&'a [f32]);

impl Source for CopyIn<'_> {
    fn write(&mut self, at: usize, out: &mut [f32]) -> Result<(), Error> {
        let n = out.len();
        out.copy_from_slice(&self.0[at..at + n]);
        Ok(())
    }
}

/// The vectorised loops: each runs compiled for the widest vector
/// instructions the CPU has (AVX2, or AVX-512 with pulp's `x86-v4`
/// feature, which the workspace enables; detected at run time by `pulp`,
/// which TFHE-rs uses too), four or eight f64 (eight or sixteen f32) wide
/// instead of the baseline x86-64 build's two (four). Each is a type whose
/// `with_simd` (and everything it calls) is `#[inline(always)]`, so the
/// loop is compiled inside pulp's target-feature function; a closure would
/// be compiled apart, for the baseline. Operations are not fused; the
/// block transforms' sums run in another order than the butterflies'
/// (within rounding of them).
enum Loop<'a> {
    /// [`signs_and_first_levels`] of one block, the signs from the stream,
    /// the squares added to the lanes.
    SignsAndFirstLevels(&'a mut [f32], &'a mut ChaCha20Rng, &'a mut [f64; 8]),
    /// [`levels`] `from..to`, in f64 (the decoding).
    Levels(&'a mut [f64], usize, usize),
    /// [`levels`] `from..to`, in f32 (the encoding).
    Levels32(&'a mut [f32], usize, usize),
    /// [`block_levels`].
    BlockLevels(&'a mut [f64]),
    /// [`round_chunk`] (returns the chunk's norm²).
    RoundChunk(&'a [f32], f64, &'a [u8], &'a mut [i64]),
    /// [`add_rounded`] (subtracting when the flag is set).
    AddRounded(&'a mut [u32], &'a [i64], u32, bool),
    /// [`centre`]: b-bit words as signed values.
    Centre(&'a [u32], &'a mut [f64], u32),
    /// [`signs_and_scale`].
    SignsAndScale(&'a mut [f64], &'a mut ChaCha20Rng, f64),
}

impl pulp::WithSimd for Loop<'_> {
    type Output = u128;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) -> u128 {
        match self {
            Loop::SignsAndFirstLevels(block, signs, lanes) => {
                signs_and_first_levels(simd, block, signs, lanes);
                0
            }
            Loop::BlockLevels(block) => {
                block_levels(simd, block);
                0
            }
            Loop::Levels(v, from, to) => {
                let n = v.len();
                levels(simd, v, from.min(n), to.min(n));
                0
            }
            Loop::Levels32(v, from, to) => {
                let n = v.len();
                levels(simd, v, from.min(n), to.min(n));
                0
            }
            Loop::RoundChunk(v, factor, coins, out) => round_chunk(v, factor, coins, out),
            Loop::AddRounded(words, rounded, mask, subtract) => {
                add_rounded(words, rounded, mask, subtract);
                0
            }
            Loop::Centre(words, out, bits) => {
                centre(words, out, bits);
                0
            }
            Loop::SignsAndScale(v, signs, factor) => {
                signs_and_scale(v, signs, factor);
                0
            }
        }
    }
}

impl Loop<'_> {
    fn run(self) -> u128 {
        pulp::Arch::new().dispatch(self)
    }
}

/// The largest lattice value rounded: 2^46, above any clipped vector's
/// coordinate (c·s < 2^45 by the calibration), so clamping to it changes
/// nothing and bounds what the integer arithmetic below sees.
const ROUNDING_LIMIT: f64 = (1u64 << 46) as f64;

/// 1.5·2^52: adding it to an integer-valued f64 below 2^51 in magnitude
/// leaves the integer in the low bits (two's complement around the
/// constant's bits), a conversion to i64 that vectorises without AVX-512.
const TO_INT: f64 = 6_755_399_441_055_744.0;

/// Rounds one chunk of the rotated vector at random into `out` and returns
/// its exact integer norm².
///
/// The lattice value x = factor·a rounds up with probability x − ⌊x⌋, to
/// 2^-16: up when a uniform u16 coin, over 2^16, is below x − ⌊x⌋ (exact in
/// f64 except for x just below 0, where it can round up by 2^-53). The
/// rounding's bias is at most 2^-16 of a lattice step, far below the noise;
/// privacy rests on the exact norm check, not on the rounding's
/// distribution. (`floor` is an instruction inside pulp's AVX2/AVX-512
/// functions, a libm call only in the baseline fallback.) Each
/// |r| ≤ 2^46 + 1 splits into 23-bit halves whose products, summed in u64
/// over a chunk (at most 2^12 values), make the norm² exactly.
#[inline(always)]
fn round_chunk(v: &[f32], factor: f64, coins: &[u8], out: &mut [i64]) -> u128 {
    const LOW: u64 = (1 << 23) - 1;
    debug_assert!(v.len() <= ROUNDING_CHUNK);
    let (mut hh, mut hl, mut ll) = (0u64, 0u64, 0u64);
    for ((o, &a), u) in out.iter_mut().zip(v).zip(coins.chunks_exact(2)) {
        // max then min, not clamp: a NaN (ruled out by the finite norm)
        // would still come out as a bounded value.
        #[allow(clippy::manual_clamp)]
        let x = (f64::from(a) * factor).max(-ROUNDING_LIMIT).min(ROUNDING_LIMIT);
        let floor = x.floor();
        let coin = f64::from(u16::from_le_bytes([u[0], u[1]])) * (1.0 / 65_536.0);
        let up = if coin < x - floor { 1.0 } else { 0.0 };
        let r = ((floor + up + TO_INT).to_bits() as i64).wrapping_sub(TO_INT.to_bits() as i64);
        *o = r;
        let m = r.unsigned_abs();
        let (hi, lo) = (u64::from((m >> 23) as u32), m & LOW);
        hh += hi * hi;
        hl += hi * lo;
        ll += lo * lo;
    }
    (u128::from(hh) << 46) + (u128::from(hl) << 24) + u128::from(ll)
}

/// `words ± rounded` modulo 2^b (`mask`).
#[inline(always)]
fn add_rounded(words: &mut [u32], rounded: &[i64], mask: u32, subtract: bool) {
    if subtract {
        words.iter_mut().zip(rounded).for_each(|(w, &a)| *w = w.wrapping_sub(a as u32) & mask);
    } else {
        words.iter_mut().zip(rounded).for_each(|(w, &a)| *w = w.wrapping_add(a as u32) & mask);
    }
}

/// `out[i]` = `words[i]` read as a b-bit two's-complement value (the
/// residue in −2^(b−1)..2^(b−1)), by shifting its sign bit to bit 31 and
/// back.
#[inline(always)]
fn centre(words: &[u32], out: &mut [f64], bits: u32) {
    let shift = 32 - bits.clamp(1, 32);
    for (o, &w) in out.iter_mut().zip(words) {
        *o = f64::from(((w << shift) as i32) >> shift);
    }
}

/// `v ← factor·D·v` for one chunk (a multiple of 64 values, the last
/// chunk excepted), D's signs from the stream, 64 per word as in the
/// encoding, flipped without a branch.
#[inline(always)]
fn signs_and_scale(v: &mut [f64], signs: &mut ChaCha20Rng, factor: f64) {
    for chunk in v.chunks_mut(64) {
        flip_signs(chunk, signs.next_u64());
        chunk.iter_mut().for_each(|a| *a *= factor);
    }
}

/// Negates `chunk[k]` (at most 64 values) where bit k of `word` is set,
/// by flipping its sign bit: no branch, and the same signs as
/// [`SignStream`] gives one by one.
#[inline(always)]
fn flip_signs<T: Real>(chunk: &mut [T], word: u64) {
    for (k, a) in chunk.iter_mut().enumerate() {
        *a = a.negated_if((word >> k) & 1);
    }
}

/// A vector ready for rounding: rotated, with the factor that clips and
/// scales it onto the lattice, applied as each value is rounded.
struct Prepared {
    v: Rotated<f32>,
    factor: f64,
}

/// `v` (zeros, [`Ddg::padded_dim_for`] long) ← H·D·(the first `d` values
/// the source writes, block by block, then zeros), H the transform of each
/// rotation block; returns ‖v‖² before the transform (H is not normalised
/// here: H² = B·I) and the source's scale.
fn rotate_in_blocks(
    v: &mut [f32],
    d: usize,
    source: &mut impl Source,
    rotation_seed: &[u8; 32],
) -> Result<(f64, f64), Error> {
    let n = v.len();
    debug_assert!(Ddg::padded_dim_for(n) == n && d <= n, "{n} is not a rotated length");
    for pass in 0..2 {
        if pass > 0 {
            // Written again: from zeros, with the same signs.
            v.fill(0.0);
        }
        let mut signs = ChaCha20Rng::from_seed(*rotation_seed);
        if n < 64 {
            // Vectors shorter than one sign word (n ≤ 32): the plain way.
            source.write(0, &mut v[..d])?;
            if let Some(scale) = source.scale() {
                let norm_sq = v.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
                flip_signs(v, signs.next_u64());
                levels(pulp::Scalar::new(), v, 1, n);
                return Ok((norm_sq, scale));
            }
            continue;
        }
        // Each cache block written, its signs flipped, its norm² taken and
        // its levels run while it is in the L1 cache, and each rotation
        // block's levels above while it is in the L2 cache: no level
        // crosses memory. The blocks past d hold zeros and stay zeros.
        let mut lanes = [0.0f64; 8];
        let b = ENCODE_BLOCK.min(n);
        let rotation = rotation_block_of(n);
        for (start, values) in (0..d).step_by(rotation).zip(v.chunks_exact_mut(rotation)) {
            let end = d.min(start + rotation);
            for (at, block) in (start..end).step_by(b).zip(values.chunks_exact_mut(b)) {
                source.write(at, &mut block[..b.min(end - at)])?;
                Loop::SignsAndFirstLevels(block, &mut signs, &mut lanes).run();
            }
            Loop::Levels32(values, b, rotation).run();
        }
        if let Some(scale) = source.scale() {
            return Ok((lanes.iter().sum(), scale));
        }
    }
    Err(Error::InvalidInput("the source asked to be written a third time".into()))
}

/// The rounding's scratch: its coins and integers, wiped when dropped,
/// and the coins' counter blocks (public).
struct RoundingBuffers {
    coins: Zeroizing<Vec<u8>>,
    rounded: Zeroizing<Vec<i64>>,
    counters: Vec<aes_vaes::Block>,
}

impl RoundingBuffers {
    fn new() -> Self {
        RoundingBuffers {
            coins: Zeroizing::new(vec![0u8; 2 * ROUNDING_CHUNK]),
            rounded: Zeroizing::new(vec![0i64; ROUNDING_CHUNK]),
            counters: Vec::with_capacity(2 * ROUNDING_CHUNK / 16),
        }
    }
}

/// One attempt of [`Ddg::round`]: the coins from `coin_seed`
/// ([`CoinStream`]); returns the exact integer norm².
fn round_once(
    rotated: &Prepared,
    coin_seed: &[u8; 32],
    buffers: &mut RoundingBuffers,
    sink: &mut impl FnMut(usize, &[i64]),
) -> u128 {
    let mut coins = CoinStream::new(coin_seed);
    let mut norm_sq: u128 = 0;
    for (c, vc) in rotated.v.chunks(ROUNDING_CHUNK).enumerate() {
        // Whole AES blocks (the last chunk of a vector under 8 values
        // long draws a few more bytes than it uses).
        let drawn = &mut buffers.coins[..(2 * vc.len()).next_multiple_of(16)];
        coins.fill(&mut buffers.counters, drawn);
        let out = &mut buffers.rounded[..vc.len()];
        norm_sq += Loop::RoundChunk(vc, rotated.factor, drawn, out).run();
        sink(c * ROUNDING_CHUNK, out);
    }
    norm_sq
}

/// The rounding's coins: the AES-128-CTR keystream of a fresh 256-bit
/// seed (the key its first 16 bytes, the first counter block its last 16,
/// counting up modulo 2^128), encrypted in bulk with VAES or AES-NI. A
/// seed is drawn for each attempt from the OS-seeded ChaCha20, so no key
/// meets a counter block twice (a failed attempt's coins are drawn again,
/// from its seed, only to take its integers back out). About three times
/// the throughput of ChaCha12 here (2 MiB of coins for a million values:
/// 0.2–0.33 against 0.6–0.7 ms), with the cipher secure aggregation's
/// masks use (they take a 32-bit counter under a round's IV; this a
/// 128-bit one from the seed).
struct CoinStream {
    /// Encryption only; its key schedule wipes itself when dropped (the
    /// `aes` crate's `zeroize` feature).
    cipher: aes_vaes::Aes128Enc,
    next: u128,
}

impl CoinStream {
    fn new(seed: &[u8; 32]) -> CoinStream {
        use aes_vaes::cipher::KeyInit;
        let mut key = Zeroizing::new([0u8; 16]);
        key.copy_from_slice(&seed[..16]);
        let mut first = [0u8; 16];
        first.copy_from_slice(&seed[16..]);
        CoinStream { cipher: aes_vaes::Aes128Enc::new((&*key).into()), next: u128::from_be_bytes(first) }
    }

    /// Writes the next `out.len()` bytes of the keystream (a multiple of
    /// 16: whole blocks), building the counter blocks in `counters` (the
    /// caller's scratch, reused across attempts; the blocks are public).
    fn fill(&mut self, counters: &mut Vec<aes_vaes::Block>, out: &mut [u8]) {
        use aes_vaes::cipher::BlockCipherEncrypt;
        let (blocks, rest) = aes_vaes::Block::slice_as_chunks_mut(out);
        debug_assert!(rest.is_empty());
        counters.clear();
        for _ in 0..blocks.len() {
            counters.push(self.next.to_be_bytes().into());
            self.next = self.next.wrapping_add(1);
        }
        // The lengths are equal by construction; block by block otherwise.
        if self.cipher.encrypt_blocks_b2b(counters, blocks).is_err() {
            for (o, c) in blocks.iter_mut().zip(counters.iter()) {
                self.cipher.encrypt_block_b2b(c, o);
            }
        }
    }
}

/// Values per block whose transform levels run while the block is in the
/// L1 cache (16 KiB of f64), in the decoding.
const DECODE_BLOCK: usize = 1 << 11;

/// The same for the encoding's f32 (16 KiB).
const ENCODE_BLOCK: usize = 1 << 12;

/// The rotation's block: vectors longer than this are padded to a multiple
/// of it (not to a power of two) and each block is rotated on its own
/// (block-diagonal H, after the signs over the whole vector). The rotation
/// stays orthonormal, so the norm is kept and privacy still rests on the
/// exact norm check; it flattens each block, which the calibration's
/// signal term accounts for (c²n²/B, not c²n²/d'). That can make the
/// lattice coarser (with many parties and little noise), which costs
/// utility and raises the accounted ε a little (the rounding's slack is
/// then a larger share of the sensitivity); the accounting follows the
/// lattice actually used. A block's levels all run
/// in the L1 and L2 caches (64 KiB of f32, 128 KiB of f64), so none
/// crosses memory, the decoding's blocks share the cores without a level
/// that spans them, and a million values take 1,015,808 words instead of
/// 2^20.
pub const ROTATION_BLOCK: usize = 1 << 14;

/// The block each part of a vector of `padded` values
/// ([`Ddg::padded_dim_for`]) is rotated in: the whole vector up to one
/// [`ROTATION_BLOCK`], that block above. One function, so that the
/// calibration, the encoding and the decoding cannot disagree on it.
fn rotation_block_of(padded: usize) -> usize {
    padded.min(ROTATION_BLOCK)
}

const _: () = assert!(ROTATION_BLOCK.is_multiple_of(DECODE_BLOCK) && ROTATION_BLOCK.is_multiple_of(ENCODE_BLOCK));

// The encoding's blocks take whole sign words.
const _: () = assert!(ENCODE_BLOCK.is_multiple_of(64));

// The decoder applies the signs chunk by chunk, 64 per word: every chunk
// but the last must start at a word boundary.
const _: () = assert!(DECODE_BLOCK.is_multiple_of(64));

/// `block ← D·block` (the next signs of [`SignStream`], 64 values per
/// word, flipped without a branch), its squares added to `lanes` (eight,
/// so the sum vectorises) and the transform's levels inside the block, in
/// one pass while it is in the L1 cache. The first four levels run on
/// sixteen values at a time in registers ([`block_levels32`]), where the
/// radix-4 loops would handle one or four per step.
#[inline(always)]
fn signs_and_first_levels<S: pulp::Simd>(simd: S, block: &mut [f32], signs: &mut ChaCha20Rng, lanes: &mut [f64; 8]) {
    // Each step a simple loop over the block (in L1), so that each
    // vectorises on its own.
    for chunk in block.chunks_exact_mut(64) {
        flip_signs(chunk, signs.next_u64());
    }
    let (groups, _) = block.as_chunks::<8>();
    for group in groups {
        for k in 0..8 {
            let a = f64::from(group[k]);
            lanes[k] += a * a;
        }
    }
    block_levels32(simd, block);
}

/// The signs of H_N's rows as sign bits of `$t`: `-0.0` where
/// H_N[j][k] = −1, i.e. popcount(j & k) is odd (XOR with it negates; H_N
/// is symmetric).
macro_rules! hadamard_signs {
    ($t:ty, $n:literal) => {{
        let mut rows = [[0.0 as $t; $n]; $n];
        let mut j: usize = 0;
        while j < $n {
            let mut k: usize = 0;
            while k < $n {
                if (j & k).count_ones() % 2 == 1 {
                    rows[j][k] = -0.0;
                }
                k += 1;
            }
            j += 1;
        }
        rows
    }};
}

/// H₈'s sign rows for f64 ([`hadamard_signs`]).
const H8_SIGNS: [[f64; 8]; 8] = hadamard_signs!(f64, 8);

/// The first levels of one block as H_n·x on each group of n values
/// (n = 8 in f64, 16 in f32: one AVX-512 register), the rest by
/// [`levels`]; blocks shorter than a group, or registers wider than one,
/// take [`levels`] from the first.
///
/// H_n·x is formed in vector registers: each input broadcast, its sign
/// pattern applied by XOR (exact), and added into the group's outputs.
/// Written with `pulp`'s vector types, because from plain arrays the
/// compiler vectorised across groups instead, with gathers and scatters
/// that took a fifth of the encoding. The outputs are sums of the same n
/// terms as the butterflies', in another order (within rounding of them).
macro_rules! block_levels_in_registers {
    ($simd:ident, $block:ident, $t:ty, $n:literal, $signs:ident, $lanes:ident, $as_simd:ident,
     $splat:ident, $add:ident, $xor:ident, $reg:ident) => {{
        let lanes = S::$lanes;
        if lanes <= $n && $n % lanes == 0 && $block.len() >= $n {
            let regs = $n / lanes;
            let zero = $simd.$splat(0.0);
            let (groups, _) = S::$as_simd($block);
            for group in groups.chunks_exact_mut(regs) {
                let mut x = [0.0 as $t; $n];
                x.copy_from_slice(pulp::bytemuck::cast_slice::<S::$reg, $t>(group));
                let mut out = [zero; $n];
                for (j, &value) in x.iter().enumerate() {
                    let broadcast = $simd.$splat(value);
                    let signs = pulp::bytemuck::cast_slice::<$t, S::$reg>(&$signs[j]);
                    for (o, &sign) in out[..regs].iter_mut().zip(signs) {
                        *o = $simd.$add(*o, $simd.$xor(broadcast, sign));
                    }
                }
                group.copy_from_slice(&out[..regs]);
            }
            let b = $block.len();
            levels($simd, $block, $n, b);
        } else {
            let b = $block.len();
            levels($simd, $block, 1, b);
        }
    }};
}

/// The levels of one f64 block (the decoding's; a power of two), the first
/// three as H₈·x ([`block_levels_in_registers`]).
#[inline(always)]
fn block_levels<S: pulp::Simd>(simd: S, block: &mut [f64]) {
    block_levels_in_registers!(
        simd,
        block,
        f64,
        8,
        H8_SIGNS,
        F64_LANES,
        as_mut_simd_f64s,
        splat_f64s,
        add_f64s,
        xor_f64s,
        f64s
    )
}

/// H₁₆'s sign rows for f32 ([`hadamard_signs`]).
const H16_SIGNS: [[f32; 16]; 16] = hadamard_signs!(f32, 16);

/// The levels of one f32 block (the encoding's), the first four as H₁₆·x
/// ([`block_levels_in_registers`]).
#[inline(always)]
fn block_levels32<S: pulp::Simd>(simd: S, block: &mut [f32]) {
    block_levels_in_registers!(
        simd,
        block,
        f32,
        16,
        H16_SIGNS,
        F32_LANES,
        as_mut_simd_f32s,
        splat_f32s,
        add_f32s,
        xor_f32s,
        f32s
    )
}

/// In-place fast Walsh–Hadamard transform of each rotation block,
/// unnormalised (H·v, H² = B·I; the whole vector's up to one block).
#[cfg(test)]
fn fwht(v: &mut [f64]) {
    fwht_with(v, |_, _| {});
}

/// [`fwht`] of the vector `write(at, block)` puts into each block of `v`
/// first (the decoding centres its words there): each rotation block's
/// transform, its cache blocks written and their levels run while each is
/// in the L1 cache, the levels above while the rotation block is in the
/// L2 cache, the rotation blocks on every core.
fn fwht_with(v: &mut [f64], write: impl Fn(usize, &mut [f64]) + Sync) {
    let n = v.len();
    debug_assert_eq!(Ddg::padded_dim_for(n), n, "not a rotated length");
    let b = DECODE_BLOCK.min(n);
    let rotation = rotation_block_of(n);
    let transform = |(g, values): (usize, &mut [f64])| {
        for (k, block) in values.chunks_exact_mut(b).enumerate() {
            write(g * rotation + k * b, block);
            Loop::BlockLevels(block).run();
        }
        Loop::Levels(values, b, rotation).run();
    };
    if n >= PARALLEL_MIN {
        v.par_chunks_exact_mut(rotation).enumerate().for_each(transform);
    } else {
        v.chunks_exact_mut(rotation).enumerate().for_each(transform);
    }
}

/// Vectors this long (and longer) are transformed on every core: the
/// decoding is on the coordinator's critical path, where the parties wait
/// for it with their cores idle. Shorter ones are a few blocks, not worth
/// the threads.
const PARALLEL_MIN: usize = 8 * ROTATION_BLOCK;

/// The largest span (16·h values) [`radix16`](Real::radix16) runs over: its
/// sixteen runs must share the L1 cache. Runs further apart are a power of
/// two of 4 KiB or more apart, so their lines fall in one set of the cache
/// and evict each other (measured, when the transform spanned 2^20 f32:
/// two radix-16 passes over its upper levels took a fifth longer than four
/// radix-4 passes).
const RADIX16_MAX_BYTES: usize = 16 << 10;

/// The transform's levels h = from, 2·from, … below `to`: four at a time
/// in registers where the sixteen runs are at least sixteen values long
/// and together fit the L1 cache, two at a time otherwise.
#[inline(always)]
fn levels<S: pulp::Simd, T: Real>(simd: S, v: &mut [T], from: usize, to: usize) {
    let mut h = from;
    while h < to {
        if h >= 16 && 16 * h <= to && 16 * h * std::mem::size_of::<T>() <= RADIX16_MAX_BYTES {
            T::radix16(simd, v, h);
            h *= 16;
        } else if 4 * h <= to {
            radix4(v, h);
            h *= 4;
        } else {
            radix2(v, h);
            h *= 2;
        }
    }
}

#[inline(always)]
fn radix2<T: Real>(v: &mut [T], h: usize) {
    for block in v.chunks_exact_mut(2 * h) {
        let (lo, hi) = block.split_at_mut(h);
        butterflies2(lo, hi);
    }
}

/// One level's butterflies between two runs h apart.
#[inline(always)]
fn butterflies2<T: Real>(lo: &mut [T], hi: &mut [T]) {
    for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
        let (x, y) = (*a, *b);
        *a = x + y;
        *b = x - y;
    }
}

/// Levels h and 2h at once.
#[inline(always)]
fn radix4<T: Real>(v: &mut [T], h: usize) {
    for block in v.chunks_exact_mut(4 * h) {
        let (q0, rest) = block.split_at_mut(h);
        let (q1, rest) = rest.split_at_mut(h);
        let (q2, q3) = rest.split_at_mut(h);
        butterflies4(q0, q1, q2, q3);
    }
}

/// Two levels' butterflies among four runs h apart.
#[inline(always)]
fn butterflies4<T: Real>(q0: &mut [T], q1: &mut [T], q2: &mut [T], q3: &mut [T]) {
    for (((a, b), c), d) in q0.iter_mut().zip(q1.iter_mut()).zip(q2.iter_mut()).zip(q3.iter_mut()) {
        let (s0, d0, s1, d1) = (*a + *b, *a - *b, *c + *d, *c - *d);
        *a = s0 + s1;
        *b = d0 + d1;
        *c = s0 - s1;
        *d = d0 - d1;
    }
}

/// H·D·v, orthonormal (for tests of the fast path).
#[cfg(test)]
fn rotate(v: &mut [f64], seed: &[u8; 32]) {
    let mut signs = SignStream::new(seed);
    for a in v.iter_mut() {
        if signs.next_negative() {
            *a = -*a;
        }
    }
    fwht(v);
    let norm = 1.0 / (v.len() as f64).sqrt();
    v.iter_mut().for_each(|a| *a *= norm);
}

/// D·H·v: the inverse of [`rotate`].
#[cfg(test)]
fn unrotate(v: &mut [f64], seed: &[u8; 32]) {
    fwht(v);
    let norm = 1.0 / (v.len() as f64).sqrt();
    let mut signs = SignStream::new(seed);
    for a in v.iter_mut() {
        *a *= if signs.next_negative() { -norm } else { norm };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Why adaptive clipping costs no ε beyond the fixed clip's: the
    /// update (clipped to C) and its count coordinate (b − ½)·κ form one
    /// vector of norm at most C′ with C′² = C² + κ²/4, noised at z·C′, so
    /// the count's noise is σ_b in count units (z·C′/κ) while the vector's
    /// noise multiplier stays z. A negative or too small σ_b is refused.
    #[test]
    fn the_joint_vector_carries_the_count_at_the_same_noise_multiplier() {
        for (clip, z, sigma_b) in [(1.0, 1.0, 2.0), (0.1, 0.7, 0.5), (30.0, 2.5, 100.0), (1e-3, 1.0, 0.51)] {
            let a = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: sigma_b };
            let (joint, kappa) = a.joint(clip, z).expect("valid");
            let rel = |x: f64, y: f64| ((x - y) / y).abs();
            assert!(
                rel(joint * joint, clip * clip + kappa * kappa / 4.0) < 1e-12,
                "C′² = C² + κ²/4 at {clip}, {z}, {sigma_b}"
            );
            assert!(rel(z * joint / kappa, sigma_b) < 1e-12, "the count's noise is σ_b at {clip}, {z}, {sigma_b}");
        }
        for sigma_b in [-2.0, 0.5, 0.0, f64::NAN] {
            let a = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: sigma_b };
            assert_eq!(a.joint(1.0, 1.0), None, "σ_b = {sigma_b} at z = 1");
        }
    }

    fn config(dim: usize, parties: usize, bits: u32) -> DdgConfig {
        DdgConfig {
            clip: 1.0,
            noise_multiplier: 1.0,
            dim,
            bits,
            max_parties: parties,
            honest_parties: parties,
            beta: (-0.5f64).exp(),
            k_stddevs: 4.0,
        }
    }

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// What secure aggregation would hand the coordinator: the parties'
    /// words (each from its vector and noise) summed modulo 2^b.
    fn modular_sum<'a>(
        ddg: &Ddg,
        parties: impl Iterator<Item = (&'a [f32], DdgNoise)>,
        seed: &[u8; 32],
        g: &mut ChaCha20Rng,
    ) -> Vec<u32> {
        let mask = if ddg.config().bits == 32 { u32::MAX } else { (1u32 << ddg.config().bits) - 1 };
        let mut sum = vec![0u32; ddg.padded_dim()];
        for (x, noise) in parties {
            let words = ddg.encode(x, noise, seed, g).expect("encode");
            sum.iter_mut().zip(&words).for_each(|(s, w)| *s = s.wrapping_add(*w) & mask);
        }
        sum
    }

    /// The chunked, vectorised decoding is bit for bit the plain one it
    /// replaced (centre as i64, the transform, one sign per value from
    /// [`SignStream`], one factor), over several chunks with a last one
    /// that is not a whole sign word, at 20 and 32 bits.
    #[test]
    fn decoding_is_the_plain_decoding() {
        let mut g = rng(11);
        // Less than a block on one thread (8,192 values), several blocks
        // on one thread (7 × 2^14), and on every core (13, 19 and 37 blocks).
        for (dim, bits) in [(5000, 20u32), (5000, 32), (100_000, 32), (200_000, 24), (300_000, 32), (600_000, 28)] {
            let ddg = Ddg::new(config(dim, 3, bits)).unwrap();
            let words: Vec<u32> = (0..ddg.padded_dim()).map(|_| g.next_u32()).collect();
            let seed = [9u8; 32];
            let modulus = 1i64 << bits;
            let mut v: Vec<f64> = words
                .iter()
                .map(|&w| {
                    let w = i64::from(w) & (modulus - 1);
                    (if w >= modulus / 2 { w - modulus } else { w }) as f64
                })
                .collect();
            // The plain radix-2 transform of each rotation block: the values
            // are integers below 2^31 · 2^14 in magnitude, exact in f64 in
            // any order, so every order of the butterflies gives the same bits.
            let block = rotation_block_of(ddg.padded_dim());
            for b in v.chunks_mut(block) {
                plain_levels(b);
            }
            let factor = 1.0 / (ddg.scale() * (block as f64).sqrt());
            let mut signs = SignStream::new(&seed);
            for a in v.iter_mut() {
                *a *= if signs.next_negative() { -factor } else { factor };
            }
            v.truncate(dim);
            let decoded = ddg.decode(&words, &seed).unwrap();
            assert!(decoded.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()), "{dim} values at {bits} bits");
        }
    }

    /// The decoder's centring is the residue in −2^(b−1)..2^(b−1) of each
    /// word modulo 2^b (bits above b ignored), through the vectorised
    /// dispatch, for every b.
    #[test]
    fn centring_reads_words_as_signed_residues() {
        let mut g = rng(3);
        let mut words: Vec<u32> = (0..1000).map(|_| g.next_u32()).collect();
        words.extend([0, 1, u32::MAX, 1 << 31, (1 << 31) - 1]);
        for bits in 2..=32u32 {
            let mut out = vec![0.0; words.len()];
            Loop::Centre(&words, &mut out, bits).run();
            for (&w, &o) in words.iter().zip(&out) {
                let modulus = 1i64 << bits;
                let r = i64::from(w) & (modulus - 1);
                let expected = if r >= modulus / 2 { r - modulus } else { r };
                assert_eq!(o, expected as f64, "word {w:#x} at {bits} bits");
            }
        }
    }

    #[test]
    fn the_rotation_buffer_is_kept_for_the_thread_and_wiped() {
        let ddg = Ddg::new(config(1000, 5, 32)).unwrap();
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.01).sin()).collect();
        let first = ddg.quantize(&x, &[3; 32], &mut rng(1)).unwrap();
        ENCODING_BUFFER.with(|b| {
            let kept = b.borrow();
            assert!(kept.len() >= ddg.padded_dim(), "the allocation is kept for the next encoding");
            assert!(kept.iter().all(|&v| v == 0.0), "and holds zeros");
        });
        // Reusing it changes nothing (rounding coins aside: same seed).
        let again = ddg.quantize(&x, &[3; 32], &mut rng(1)).unwrap();
        assert_eq!(*first, *again);
    }

    /// The encoding's fused pass (signs, norm, the levels inside cache
    /// blocks) and the levels above are the reference rotation (the signs
    /// over the whole vector, then a plain radix-2 transform of each
    /// rotation block), at sizes that take every path: below one sign word,
    /// inside one cache block, several, one rotation block and several (a
    /// length that is not a power of two among them); with the input
    /// filling all of it or part (a last block in part, padding blocks
    /// never filled, which stay zeros).
    #[test]
    fn the_fused_rotation_is_the_reference_rotation() {
        let seed = [9u8; 32];
        let b = ENCODE_BLOCK;
        let r = ROTATION_BLOCK;
        // (n, d): d = n at every size; then a last block filled in part, a
        // single value, and padding blocks that are never filled; past one
        // rotation block, a last one filled in part, or not at all.
        let mut cases: Vec<(usize, usize)> =
            [0, 1, 3, 5, 6, 7, 11, 12, 13, 14, 16].map(|log| (1 << log, 1 << log)).to_vec();
        cases.extend([
            (64, 1),
            (64, 37),
            (r, r - 5),
            (r, b + 1),
            (r, 2 * b),
            (1 << 16, 3 * b + 17),
            (3 * r, 3 * r),
            (5 * r, 4 * r + 2 * b + 3),
            (5 * r, 4 * r),
        ]);
        for (n, d) in cases {
            assert_eq!(Ddg::padded_dim_for(n), n, "{n} is a rotated length");
            let x: Vec<f32> = (0..d).map(|i| ((i * 2654435761) % 1000) as f32 / 7.0 - 50.0).collect();
            let mut want: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
            want.resize(n, 0.0);
            let mut signs = SignStream::new(&seed);
            want.iter_mut().for_each(|a| *a = if signs.next_negative() { -*a } else { *a });
            for block in want.chunks_mut(r) {
                plain_levels(block);
            }
            // Written once, and written again after a first pass of other
            // values (a source that asks for a second pass).
            for passes in [1, 2] {
                let mut got = vec![0.0f32; n];
                let mut source = Recorded { x: &x, filled: Vec::new(), passes_left: passes };
                let (norm_sq, scale) = rotate_in_blocks(&mut got, d, &mut source, &seed).unwrap();
                assert_eq!(scale, 1.0);
                let blocks: Vec<_> = if n < 64 {
                    vec![(0, d)]
                } else {
                    let b = b.min(n);
                    (0..d).step_by(b).map(|at| (at, b.min(d - at))).collect()
                };
                let written: Vec<_> = blocks.iter().copied().cycle().take(passes * blocks.len()).collect();
                assert_eq!(source.filled, written, "n = {n}, d = {d}: the blocks holding values, in order, each pass");
                let norm_x: f64 = x.iter().map(|&a| f64::from(a) * f64::from(a)).sum();
                assert!((norm_sq - norm_x).abs() <= 1e-12 * norm_x, "n = {n}, d = {d}: norm² {norm_sq} vs {norm_x}");
                // In f32: within 10^-5 of ‖x‖ (a typical coordinate's RMS in
                // the unnormalised transform is a block's norm); the error is
                // about 2^-22 of it.
                let tolerance = 1e-5 * norm_x.sqrt();
                for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((f64::from(g) - w).abs() < tolerance, "n = {n}, d = {d}, [{i}]: {g} vs {w}");
                }
            }
        }
    }

    /// Writes `x`, recording the blocks; before its last pass, writes other
    /// values (sevens) and asks to be written again.
    struct Recorded<'a> {
        x: &'a [f32],
        filled: Vec<(usize, usize)>,
        passes_left: usize,
    }

    impl Source for Recorded<'_> {
        fn write(&mut self, at: usize, out: &mut [f32]) -> Result<(), Error> {
            self.filled.push((at, out.len()));
            if self.passes_left > 1 {
                out.fill(7.0);
            } else {
                out.copy_from_slice(&self.x[at..at + out.len()]);
            }
            Ok(())
        }
        fn scale(&mut self) -> Option<f64> {
            self.passes_left -= 1;
            (self.passes_left == 0).then_some(1.0)
        }
    }

    /// The transform one radix-2 level at a time: the reference.
    fn plain_levels<T: Real>(v: &mut [T]) {
        let mut h = 1;
        while h < v.len() {
            radix2(v, h);
            h *= 2;
        }
    }

    /// Four levels in registers are the radix-2 butterflies in their order:
    /// the same bits, in f32 and f64, under every instruction set the CPU
    /// has (runs of one register, of several, and of one value under the
    /// scalar fallback).
    /// A transform of a slice, to run under a chosen instruction set.
    trait Transform<T> {
        fn apply<S: pulp::Simd>(&self, simd: S, v: &mut [T]);
    }

    /// `x` transformed by `t` under every instruction set the CPU has (the
    /// scalar fallback, AVX2, AVX-512), each result with its name: not only
    /// the widest, which the dispatch picks.
    fn under_every_isa<T: Clone, F: Transform<T>>(t: &F, x: &[T]) -> Vec<(&'static str, Vec<T>)> {
        struct Op<'a, T, F>(&'a F, &'a mut [T]);
        impl<T, F: Transform<T>> pulp::WithSimd for Op<'_, T, F> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, simd: S) {
                self.0.apply(simd, self.1);
            }
        }
        let mut runs = Vec::new();
        let mut got = x.to_vec();
        pulp::Simd::vectorize(pulp::Scalar::new(), Op(t, &mut got));
        runs.push(("scalar", got));
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V3::try_new() {
            let mut got = x.to_vec();
            pulp::Simd::vectorize(simd, Op(t, &mut got));
            runs.push(("avx2", got));
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = pulp::x86::V4::try_new() {
            let mut got = x.to_vec();
            pulp::Simd::vectorize(simd, Op(t, &mut got));
            runs.push(("avx512", got));
        }
        runs
    }

    #[test]
    fn radix16_levels_are_the_radix2_levels_bit_for_bit() {
        struct Radix16(usize);
        impl<T: Real> Transform<T> for Radix16 {
            #[inline(always)]
            fn apply<S: pulp::Simd>(&self, simd: S, v: &mut [T]) {
                T::radix16(simd, v, self.0);
            }
        }
        fn check<T: Real + PartialEq + std::fmt::Debug>(x: &[T], h: usize) {
            let mut want = x.to_vec();
            for level in 0..4 {
                radix2(&mut want, h << level);
            }
            for (isa, got) in under_every_isa(&Radix16(h), x) {
                assert_eq!(got, want, "{isa}, h = {h}");
            }
        }
        for h in [16, 32, 64, 256] {
            // Three blocks of 16h, values whose sums round in f32.
            let n = 3 * 16 * h;
            let x: Vec<f64> = (0..n).map(|i| ((i * 2654435761) % 100_003) as f64 / 7.3 - 6_000.0).collect();
            check(&x, h);
            let x32: Vec<f32> = x.iter().map(|&a| a as f32 * 1.000_001).collect();
            check(&x32, h);
        }
    }

    /// A block's levels are the plain radix-2 levels' (to rounding) under
    /// every instruction set the CPU has, not only the widest the dispatch
    /// picks: the group transform's registers hold a group (AVX-512), half
    /// of one (AVX2) or a value (the fallback).
    #[test]
    fn block_levels_are_the_plain_levels_under_every_instruction_set() {
        struct BlockLevels;
        impl Transform<f64> for BlockLevels {
            #[inline(always)]
            fn apply<S: pulp::Simd>(&self, simd: S, v: &mut [f64]) {
                block_levels(simd, v);
            }
        }
        for n in [8, 64, DECODE_BLOCK] {
            let x: Vec<f64> = (0..n).map(|i| ((i * 2654435761) % 1000) as f64 / 7.0 - 50.0).collect();
            let mut want = x.clone();
            plain_levels(&mut want);
            for (isa, got) in under_every_isa(&BlockLevels, &x) {
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() < 1e-9 * (1.0 + w.abs()), "{isa}, n = {n}, [{i}]: {g} vs {w}");
                }
            }
        }
    }

    /// [`block_levels32`] (the encoding's, in f32, H₁₆ in registers) against
    /// the plain levels in f64, under every instruction set the CPU has.
    #[test]
    fn block_levels32_are_the_plain_levels_under_every_instruction_set() {
        struct BlockLevels32;
        impl Transform<f32> for BlockLevels32 {
            #[inline(always)]
            fn apply<S: pulp::Simd>(&self, simd: S, v: &mut [f32]) {
                block_levels32(simd, v);
            }
        }
        for n in [16, 64, ENCODE_BLOCK] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 2654435761) % 1000) as f32 / 7.0 - 50.0).collect();
            let mut want: Vec<f64> = x.iter().map(|&a| f64::from(a)).collect();
            plain_levels(&mut want);
            let norm: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
            for (isa, got) in under_every_isa(&BlockLevels32, &x) {
                for (i, (&g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((f64::from(g) - w).abs() < 1e-5 * norm, "{isa}, n = {n}, [{i}]: {g} vs {w}");
                }
            }
        }
    }

    /// The coins are AES-128-CTR: FIPS-197's AES-128 example as the first
    /// block, and the `ctr` crate's keystream over many calls of uneven
    /// lengths, across the counter's wrap at 2^128.
    #[test]
    fn the_rounding_coins_are_the_aes_ctr_keystream() {
        use ctr::cipher::{KeyIvInit, StreamCipher};
        let hex = |s: &str| -> Vec<u8> {
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
        };
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(&hex("000102030405060708090a0b0c0d0e0f"));
        seed[16..].copy_from_slice(&hex("00112233445566778899aabbccddeeff"));
        let mut counters = Vec::new();
        let mut first = [0u8; 16];
        CoinStream::new(&seed).fill(&mut counters, &mut first);
        assert_eq!(first.to_vec(), hex("69c4e0d86a7b0430d8cdb78070b4c55a"));

        seed[16..].copy_from_slice(&(u128::MAX - 5).to_be_bytes());
        let mut stream = CoinStream::new(&seed);
        let mut got = vec![0u8; 16 * 600];
        let mut at = 0;
        for blocks in [1, 3, 512, 7, 0, 77] {
            stream.fill(&mut counters, &mut got[at..at + 16 * blocks]);
            at += 16 * blocks;
        }
        let mut want = vec![0u8; at];
        ctr::Ctr128BE::<aes::Aes128>::new(seed[..16].into(), seed[16..].into()).apply_keystream(&mut want);
        assert_eq!(got[..at], want[..]);
    }

    /// The blocked, radix-4 transform is the Hadamard matrix: against the
    /// definition H[i][j] = (−1)^popcount(i & j) at every size up to 2^13
    /// (past one cache block).
    #[test]
    fn the_fast_transform_is_the_hadamard_matrix() {
        for log in 0..=13 {
            let n = 1usize << log;
            let x: Vec<f64> = (0..n).map(|i| ((i * 2654435761) % 1000) as f64 / 7.0 - 50.0).collect();
            let mut fast = x.clone();
            fwht(&mut fast);
            for i in (0..n).step_by((n / 64).max(1)) {
                let want: f64 =
                    x.iter().enumerate().map(|(j, &a)| if (i & j).count_ones() % 2 == 0 { a } else { -a }).sum();
                assert!((fast[i] - want).abs() < 1e-9 * (1.0 + want.abs()), "n = {n}, row {i}: {} vs {want}", fast[i]);
            }
        }
    }

    #[test]
    fn rotation_is_orthonormal_and_inverted() {
        let seed = [7u8; 32];
        let x: Vec<f64> = (0..64).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut y = x.clone();
        rotate(&mut y, &seed);
        let (nx, ny) = (x.iter().map(|a| a * a).sum::<f64>(), y.iter().map(|a| a * a).sum::<f64>());
        assert!((nx - ny).abs() < 1e-12 * nx);
        unrotate(&mut y, &seed);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-12);
        }
        // A one-hot vector is spread flat: every coordinate ±1/√d.
        let mut e = vec![0.0; 64];
        e[5] = 1.0;
        rotate(&mut e, &seed);
        assert!(e.iter().all(|a| (a.abs() - 0.125).abs() < 1e-12));
    }

    /// A failed rounding attempt is taken back out of the words exactly:
    /// with a vector built to sit on the bound (integer coordinates whose
    /// squares sum to just under it, and 58 halves that each round up with
    /// probability ½), about half the attempts fail, and after every
    /// accepted one the words are the noise plus that attempt's integers,
    /// whose exact norm² is within the bound.
    #[test]
    fn failed_rounding_attempts_leave_the_noise_intact() {
        let ddg = Ddg::new(DdgConfig { beta: 0.99, ..config(64, 5, 20) }).unwrap();
        let mask = ddg.word_mask();
        // Greedy: six integers whose squares sum to within a few of
        // bound² − 29 (the halves' mean excess).
        let mut v = vec![0.5f64; 64];
        let mut left = ddg.bound_sq - 29;
        for a in v.iter_mut().take(6) {
            let root = (left as f64).sqrt().floor() as u128;
            let root = (root.saturating_sub(2)..=root + 2).filter(|r| r * r <= left).max().unwrap();
            assert!(root < 1 << 24, "exact in the encoding's f32");
            *a = root as f64;
            left -= root * root;
        }
        assert!(left < 4, "the integers sit on the bound ({left} left)");
        let mut g = rng(5);
        let (mut failed, mut accepted) = (0, 0);
        for _ in 0..40 {
            let noise: Vec<u32> = (0..64).map(|_| g.next_u32() & mask).collect();
            let mut words = noise.clone();
            let mut last = vec![0i64; 64];
            let prepared = Prepared { v: Rotated(v.iter().map(|&a| a as f32).collect()), factor: 1.0 };
            ddg.round(&prepared, &mut g, |at, r, undo| {
                add_rounded(&mut words[at..at + r.len()], r, mask, undo);
                if undo {
                    failed += 1;
                } else {
                    last[at..at + r.len()].copy_from_slice(r);
                }
            })
            .unwrap();
            accepted += 1;
            let norm_sq: u128 = last.iter().map(|&r| u128::from(r.unsigned_abs()).pow(2)).sum();
            assert!(norm_sq <= ddg.bound_sq);
            for ((w, e), r) in words.iter().zip(&noise).zip(&last) {
                assert_eq!(*w, e.wrapping_add(*r as u32) & mask);
            }
        }
        assert!(failed >= 10 && accepted == 40, "{failed} failed attempts over {accepted} roundings");
    }

    /// Below the clip a vector keeps its norm (to rounding); above it, it is
    /// clipped to the clip; every rounded vector respects the integer bound.
    #[test]
    fn quantization_clips_and_keeps_the_integer_norm_bound() {
        let ddg = Ddg::new(config(1000, 10, 20)).expect("params");
        let mut g = rng(1);
        // Norm of the pattern: ≈ 118 × scale.
        for scale in [1e-3f32, 5e-3, 1.0, 1e6] {
            let x: Vec<f32> = (0..1000).map(|i| scale * ((i * 7919) % 13) as f32 - 6.0 * scale).collect();
            let norm_x = x.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
            let q = ddg.quantize(&x, &[1; 32], &mut g).expect("quantize");
            let norm_sq: u128 = q.iter().map(|&a| (a as i128 * a as i128) as u128).sum();
            assert!(norm_sq <= ddg.bound_sq, "scale {scale}: {norm_sq} > {}", ddg.bound_sq);
            let norm_q = (norm_sq as f64).sqrt() / ddg.scale();
            let expected = norm_x.min(1.0);
            // Rounding moves the norm by at most √d' lattice steps.
            let slack = (ddg.padded_dim() as f64).sqrt() / ddg.scale();
            assert!((norm_q - expected).abs() <= slack, "scale {scale}: norm {norm_q}, expected {expected}");
        }
        // The bound is the clip (scaled) up to the rounding's inflation.
        assert!(ddg.l2_sensitivity() >= ddg.scale() && ddg.l2_sensitivity() < ddg.scale() * 1.05);
    }

    /// The sum of clipped vectors comes back from the modular sum: at 32
    /// bits, and at 16 bits where the sum wraps around the modulus and holds
    /// negative values that decoding re-centres.
    #[test]
    fn the_modular_sum_decodes_to_the_sum_of_clipped_vectors() {
        for (bits, dim, parties, seed) in [(32u32, 300usize, 5usize, [3u8; 32]), (16, 64, 4, [5; 32])] {
            let ddg = Ddg::new(config(dim, parties, bits)).expect("params");
            let mut g = rng(u64::from(bits));
            let xs: Vec<Vec<f32>> =
                (0..parties).map(|p| (0..dim).map(|i| (((i + p * 31) % 17) as f32 - 12.0) * 0.002).collect()).collect();
            let zero = || DdgNoise::zero(ddg.padded_dim());
            let sum = modular_sum(&ddg, xs.iter().map(|x| (x.as_slice(), zero())), &seed, &mut g);
            let half = if bits == 32 { 1u32 << 31 } else { 1 << (bits - 1) };
            assert!(sum.iter().any(|&w| w >= half), "{bits} bits: some words hold negative values");
            let decoded = ddg.decode(&sum, &seed).expect("decode");
            for (i, d) in decoded.iter().enumerate() {
                let want: f64 = xs.iter().map(|x| f64::from(x[i])).sum();
                // Rounding error only: a few lattice steps per party at most.
                assert!((d - want).abs() < 4.0 * parties as f64 / ddg.scale(), "{bits} bits, {i}: {d} vs {want}");
            }
        }
        let (dim, seed) = (300, [3u8; 32]);
        let ddg = Ddg::new(config(dim, 5, 32)).expect("params");
        let mut g = rng(2);
        // A huge vector is clipped: its contribution has norm at most the
        // clip plus the rounding's inflation (Δ̃₂ = l2_sensitivity / s).
        let huge: Vec<f32> = (0..dim).map(|i| 1e3 * (i as f32 + 1.0)).collect();
        let words = ddg.encode(&huge, DdgNoise::zero(ddg.padded_dim()), &seed, &mut g).expect("encode");
        let back = ddg.decode(&words, &seed).expect("decode");
        let norm = back.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(norm <= ddg.l2_sensitivity() / ddg.scale() + 1e-9, "norm {norm}");
    }

    /// The noise in the decoded sum has the calibrated variance: survivors ×
    /// σ² in lattice units, with every party surviving and with two dropped;
    /// and the noise of the honest parties alone (4 of 6 here) carries the
    /// whole (z·c)², not that of all 6.
    #[test]
    fn summed_noise_has_the_calibrated_variance() {
        let (dim, parties) = (4096, 6);
        let ddg = Ddg::new(DdgConfig { honest_parties: 4, ..config(dim, parties, 32) }).expect("params");
        let seed = [9u8; 32];
        let mut g = rng(3);
        let x = vec![0f32; dim];
        for survivors in [parties, parties - 2] {
            let inputs = (0..survivors).map(|_| (x.as_slice(), ddg.sample_noise().expect("noise")));
            let sum = modular_sum(&ddg, inputs, &seed, &mut g);
            let decoded = ddg.decode(&sum, &seed).expect("decode");
            let var = decoded.iter().map(|a| a * a).sum::<f64>() / dim as f64;
            let want = survivors as f64 * f64::from(ddg.local_sigma()).powi(2) / ddg.scale().powi(2);
            // 4096 coordinates: the sample variance's relative sd is 2.2%, so
            // 15% is 6.8 sd (a false alarm below 10^-11; the noise is fresh).
            assert!((var / want - 1.0).abs() < 0.15, "{survivors} survivors: variance {var}, calibrated {want}");
            // And the honest noise alone carries (z·c)² = 1: σ_int ≥ z·c·s/√n_h
            // (a calibration for all 6 would give 4/6), with no more than
            // the ceiling's slack on top.
            let honest = ddg.config().honest_parties as f64;
            let central = f64::from(ddg.local_sigma()).powi(2) * honest / ddg.scale().powi(2);
            assert!((1.0 - 1e-9..1.001).contains(&central), "honest noise variance {central}");
        }
    }

    #[test]
    fn rdp_without_collusion_effects_is_the_gaussians() {
        // Large σ: τ underflows, and ε(α) = α·l2²/2 with l2 ≈ 1/z.
        let ddg = Ddg::new(config(1 << 16, 10, 32)).expect("params");
        let crate::rdp::DpEvent::DistributedDiscreteGaussian { l1_scale, l2_scale, tau: t, dim } = ddg.event() else {
            panic!("event")
        };
        assert_eq!(t, 0.0);
        assert!((l2_scale - 1.0).abs() < 1e-3, "l2 scale {l2_scale}");
        assert!((ddg_rdp(8.0, l1_scale, l2_scale, t, dim) - 4.0 * l2_scale * l2_scale).abs() < 1e-12);
        // Small σ: τ is positive and the bound exceeds the Gaussian's.
        assert!(tau(1.0, 10) > 0.0 && ddg_rdp(8.0, 3.0, 1.0, tau(1.0, 10), 100) > 4.0);
    }

    /// The spec's bound covers the mechanism at every model size: at each
    /// order, the worst event's RDP is at least the actual one's.
    #[test]
    fn the_bound_over_sizes_covers_every_model() {
        let cfg = config(1, 10, 16);
        let events = events_up_to(&cfg, 1 << 20).expect("events");
        // 1, 2, 4, …, 2^14, then 2^20 (the longest multiple of the block).
        assert_eq!(events.len(), 16);
        for dim in [1usize, 3, 1000, 16_385, 65_537, 1_000_000, 1 << 20] {
            let actual = Ddg::new(DdgConfig { dim, ..cfg }).expect("params").event();
            for a in [2.0, 8.0, 64.0, 256.0] {
                let worst = events.iter().map(|e| e.rdp(a)).fold(0.0, f64::max);
                assert!(actual.rdp(a) <= worst, "dim {dim}, order {a}");
            }
        }
        assert!(events_up_to(&cfg, MAX_PADDED_DIM + 1).is_err());
        assert!(events_up_to(&cfg, 0).is_err());
    }

    /// The mechanism in lattice units does not depend on the clip: the
    /// scale follows it, so σ and the accountant's event are the same at
    /// every clip (adaptive clipping relies on it: the ledger is charged at
    /// the spec's clip, a round runs at the coordinator's). Also for noise
    /// multipliers picked so that σ before its ceiling is an integer to
    /// the last bits, where a clip that entered the arithmetic made σ one
    /// step lower at some clips (found by review).
    #[test]
    fn the_mechanism_does_not_depend_on_the_clip() {
        let clips = [1.0 / 1_048_576.0, 1e-3, 0.37, 1.0, 30.19, 1e3, 1_048_576.0];
        let same = |cfg: DdgConfig| {
            let base = Ddg::new(DdgConfig { clip: 1.0, ..cfg }).expect("params");
            for clip in clips {
                let other = Ddg::new(DdgConfig { clip, ..cfg }).expect("params");
                let what = format!("bits {}, z {:e}, clip {clip}", cfg.bits, cfg.noise_multiplier);
                assert_eq!(other.local_sigma(), base.local_sigma(), "{what}");
                assert_eq!(other.calibration().bound.to_bits(), base.calibration().bound.to_bits(), "{what}");
                assert_eq!(other.calibration().bound_sq, base.calibration().bound_sq, "{what}");
                for a in [2.0, 16.0, 128.0] {
                    assert_eq!(other.event().rdp(a).to_bits(), base.event().rdp(a).to_bits(), "{what}, order {a}");
                }
            }
        };
        for bits in [16u32, 32] {
            same(config(5000, 10, bits));
        }
        // z with σ* (before the ceiling) at an integer: found by bisection,
        // then every z within 64 ulps of it.
        let cfg = DdgConfig { dim: 1 << 20, bits: 16, max_parties: 10, honest_parties: 7, ..config(1, 10, 16) };
        let sigma_at = |z: f64| {
            let c = Calibration::of(&DdgConfig { noise_multiplier: z, clip: 1.0, ..cfg }).expect("params");
            let unit = z / 7f64.sqrt();
            unit * c.scale
        };
        for target in [2586.0, 1000.0, 17.0] {
            let (mut lo, mut hi) = (1e-3, 1e3);
            for _ in 0..200 {
                let mid = 0.5 * (lo + hi);
                if sigma_at(mid) < target { lo = mid } else { hi = mid }
            }
            for step in -64i64..=64 {
                let z = f64::from_bits((hi.to_bits() as i64 + step) as u64);
                same(DdgConfig { noise_multiplier: z, ..cfg });
            }
        }
    }

    #[test]
    fn bad_configurations_name_the_field() {
        for (cfg, field) in [
            (DdgConfig { clip: 0.0, ..config(10, 3, 16) }, "clip"),
            (DdgConfig { bits: 1, ..config(10, 3, 16) }, "bits"),
            (DdgConfig { honest_parties: 4, ..config(10, 3, 16) }, "honest_parties"),
            (DdgConfig { beta: 1.0, ..config(10, 3, 16) }, "beta"),
            (DdgConfig { dim: 0, ..config(10, 3, 16) }, "dim"),
            (config(10, 100, 3), "bits"),
            // A lattice finer than the rounding's integers take (c·s ≥ 2^45).
            (DdgConfig { noise_multiplier: 1e-6, k_stddevs: 1e-5, ..config(1, 1, 32) }, "k_stddevs"),
        ] {
            let err = Ddg::new(cfg).expect_err("refused").to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let ddg = Ddg::new(config(10, 3, 16)).expect("params");
        assert!(ddg.quantize(&[1.0; 9], &[0; 32], &mut rng(1)).is_err());
        assert!(ddg.quantize(&[f32::NAN; 10], &[0; 32], &mut rng(1)).is_err());
        // Noise kept for words of another width is refused.
        // (σ is at the sampler's cap at 31 and 32 bits: only b differs.)
        let other = Ddg::new(config(10, 3, 31)).expect("params").sample_noise().expect("noise");
        let ddg = Ddg::new(config(10, 3, 32)).expect("params");
        assert_eq!(other.sigma(), ddg.local_sigma(), "the same σ: only b differs");
        let err = ddg.encode(&[0.1; 10], other, &[0; 32], &mut rng(1)).expect_err("refused").to_string();
        assert!(err.contains("2^31"), "{err}");
        // Noise of another mechanism (another σ, here half the noise) is
        // refused: it would change the guarantee.
        let weaker = Ddg::new(DdgConfig { noise_multiplier: 0.5, ..config(10, 3, 16) }).expect("params");
        let ddg = Ddg::new(config(10, 3, 16)).expect("params");
        assert_ne!(weaker.local_sigma(), ddg.local_sigma());
        let noise = weaker.sample_noise().expect("noise");
        let err = ddg.encode(&[0.1; 10], noise, &[0; 32], &mut rng(1)).expect_err("refused").to_string();
        assert!(err.contains("noise drawn at σ"), "{err}");
    }

    /// `encode` is the noise plus `quantize`'s integers, modulo 2^b, when
    /// both draw their coins from the same seeded generator: over four
    /// rounding chunks (3·4,096 values padded to 2^14), at 16 and 32 bits,
    /// for a clipped vector at β = 0.99, where at 16 bits some attempts
    /// fail.
    /// The trials' own failed attempts (the same generators' seeds) are
    /// counted, so the comparison covers attempts taken back out.
    #[test]
    fn encoding_is_the_noise_plus_the_quantized_vector() {
        for bits in [16, 32] {
            let ddg = Ddg::new(DdgConfig { beta: 0.99, ..config(3 * ROUNDING_CHUNK, 5, bits) }).expect("params");
            let x: Vec<f32> = (0..3 * ROUNDING_CHUNK).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
            let seed = [4u8; 32];
            let rotated = ddg.rotated(&mut CopyIn(&x), &seed).expect("rotated");
            let mut undone = 0;
            for trial in 0..8 {
                ddg.round(&rotated, &mut rng(trial), |_, _, undo| undone += usize::from(undo)).expect("round");
            }
            // At 32 bits the lattice is so fine that the clip's margin
            // (`CLIP_MARGIN`) leaves the rounding room: no attempt fails.
            if bits == 16 {
                assert!(undone >= 4, "{undone} undone chunks over the trials' roundings: no attempt failed");
            }
            drop(rotated);
            for trial in 0..8 {
                let noise = ddg.sample_noise().expect("noise");
                let residues = noise.0.clone();
                let words = ddg.encode(&x, noise, &seed, &mut rng(trial)).expect("encode");
                let quantized = ddg.quantize(&x, &seed, &mut rng(trial)).expect("quantize");
                let mask = ddg.word_mask();
                for ((w, e), q) in words.iter().zip(residues.iter()).zip(quantized.iter()) {
                    assert_eq!(*w, e.wrapping_add(*q as u32) & mask, "{bits} bits");
                }
            }
        }
    }

    /// Vectors clipped to the norm, on the largest lattices (32-bit words,
    /// few parties, so the scale is at its largest) and small dimensions
    /// (each coordinate many lattice steps), all encode: the f32
    /// rotation's error must not push the rounded norm past the bound, or
    /// the conditional rounding would fail every attempt.
    #[test]
    fn clipped_vectors_encode_on_the_largest_lattices() {
        let mut g = rng(11);
        for (dim, parties) in [(20, 2), (31, 3), (62, 4), (200, 4), (3000, 10)] {
            let ddg = Ddg::new(DdgConfig { noise_multiplier: 0.5, ..config(dim, parties, 32) }).unwrap();
            let mut failed = 0;
            for _ in 0..200 {
                // Norms from just above the clip to 100 times it.
                let stretch = 1.0 + 99.0 * f64::from(g.next_u32() % 1000) / 1000.0;
                let x: Vec<f32> =
                    (0..dim).map(|_| (f64::from(g.next_u32()) / f64::from(u32::MAX) - 0.5) as f32).collect();
                let norm = x.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
                let x: Vec<f32> = x.iter().map(|&a| (f64::from(a) * stretch / norm) as f32).collect();
                let prepared = ddg.rotated(&mut CopyIn(&x), &[5; 32]).unwrap();
                let mut attempts = 0;
                ddg.round(&prepared, &mut g, |_, _, undo| attempts += usize::from(undo)).unwrap();
                failed += attempts;
            }
            assert!(ddg.scale() * ddg.config().clip > f64::from(1u32 << 27), "the lattice is among the largest");
            // With the margin, an attempt fails as rarely as β makes it.
            assert!(failed < 20, "dim {dim}: {failed} failed attempts over 200 vectors");
        }
    }

    /// The rounding's norm² from 23-bit halves is the exact sum of squares,
    /// for a full chunk of values up to the clamp (2^46), negative and
    /// positive, and every value rounds to its floor or the next integer.
    #[test]
    fn the_rounding_norm_is_exact_at_the_limit() {
        let mut g = rng(3);
        // The rotated values are f32; the factor (here 2^23) carries them
        // to the lattice's scale, up to the clamp.
        let factor = f64::from(1u32 << 23);
        let v: Vec<f32> = (0..ROUNDING_CHUNK)
            .map(|i| {
                let magnitude = (ROUNDING_LIMIT / factor) * (f64::from(g.next_u32()) / f64::from(u32::MAX));
                let x = if i % 7 == 0 {
                    ROUNDING_LIMIT / factor
                } else if i % 5 == 1 {
                    // Small lattice values with a fraction to round.
                    (f64::from(g.next_u32() % 1000) + 0.25) / factor
                } else {
                    magnitude
                };
                let x = x as f32;
                if i % 2 == 0 { x } else { -x }
            })
            .collect();
        let mut coins = vec![0u8; 2 * ROUNDING_CHUNK];
        g.fill_bytes(&mut coins);
        let mut out = vec![0i64; ROUNDING_CHUNK];
        // Through the dispatch the encoder uses (the vectorised build).
        let norm_sq = Loop::RoundChunk(&v, factor, &coins, &mut out).run();
        let want: u128 = out.iter().map(|&r| u128::from(r.unsigned_abs()).pow(2)).sum();
        assert_eq!(norm_sq, want);
        assert!(want > 1u128 << 100, "values near the limit: {want}");
        for (&r, &a) in out.iter().zip(&v) {
            let x = f64::from(a) * factor;
            assert!(r as f64 == x.floor() || r as f64 == x.floor() + 1.0, "{x} → {r}");
        }
        assert!(v.iter().any(|&a| (f64::from(a) * factor).fract() != 0.0), "some values round");
    }

    /// Above one rotation block, vectors are padded to a multiple of it,
    /// not to a power of two; below, to a power of two, as before.
    #[test]
    fn vectors_are_padded_to_a_power_of_two_up_to_one_block_then_to_a_multiple_of_it() {
        let r = ROTATION_BLOCK;
        for (dim, padded) in
            [(1, 1), (5, 8), (r - 1, r), (r, r), (r + 1, 2 * r), (3 * r, 3 * r), (1_000_000, 1_015_808)]
        {
            assert_eq!(Ddg::padded_dim_for(dim), padded, "{dim}");
            assert_eq!(Ddg::new(config(dim, 3, 24)).unwrap().padded_dim(), padded, "{dim}");
        }
    }

    /// Past one rotation block, each order's RDP grows with the rotated
    /// length: what lets [`events_up_to`] account the longest alone.
    #[test]
    fn past_one_block_the_round_costs_more_the_longer_the_vector() {
        for (parties, bits, z) in [(3, 20u32, 1.0), (10, 20, 0.7), (50, 24, 1.5), (200, 32, 0.5)] {
            let cfg = DdgConfig { noise_multiplier: z, ..config(1, parties, bits) };
            let mut last: Option<Vec<f64>> = None;
            for blocks in [1usize, 2, 3, 7, 61, 62, 1000, 4096] {
                let calibration = Calibration::of(&DdgConfig { dim: blocks * ROTATION_BLOCK, ..cfg }).unwrap();
                let crate::rdp::DpEvent::DistributedDiscreteGaussian { l1_scale, l2_scale, tau, dim } =
                    calibration.event(cfg.honest_parties)
                else {
                    panic!("not a distributed discrete Gaussian")
                };
                let rdp: Vec<f64> =
                    [1.5, 2.0, 4.0, 16.0, 256.0].iter().map(|&a| ddg_rdp(a, l1_scale, l2_scale, tau, dim)).collect();
                if let Some(before) = &last {
                    assert!(
                        rdp.iter().zip(before).all(|(now, then)| now >= then),
                        "{blocks} blocks: {rdp:?} < {before:?}"
                    );
                }
                last = Some(rdp);
            }
        }
    }
}
