//! How a party's update travels inside a modular sum, written once for every
//! protocol that sums (SecAgg+ now, threshold HE next).
//!
//! A party with `n` examples encodes `n / max_examples · (local − global)`
//! coordinate-wise in fixed point ([`FixedPoint`]) and appends `n` as one
//! more word. Summing the encodings of the contributors therefore reveals
//! Σ nᵢ·(localᵢ − global) (after scaling back by `max_examples`) and Σ nᵢ,
//! exactly what a weighted mean needs, and nothing per party. Two more words
//! carry the party's training loss the same way (n/max_examples · loss,
//! capped at [`LOSS_CAP`], and n again when it reported one), so the
//! coordinator learns the example-weighted mean loss of the round and not
//! any party's. Under party-level DP with distributed noise,
//! [`NoisyUpdate`] replaces it: clipped updates, each with its share of the
//! noise, weighing 1.

use std::ops::Range;

use confide_algorithms::Parameters;
use confide_algorithms::params::scaled_difference_into;
use confide_algorithms::trainer::is_input_standardisation;
use confide_dp::ddg::{AdaptiveClip, Ddg, DdgConfig, DdgNoise, MAX_PADDED_DIM};

use crate::Error;
use crate::secagg::encoding::FixedPoint;

/// Training losses above this are counted as this in the secure mean.
pub const LOSS_CAP: f64 = 100.0;

/// The agreed encoding of example-weighted updates for one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedUpdate {
    fixed: FixedPoint,
    max_examples: u64,
}

impl WeightedUpdate {
    /// The encoding into Z_{2^bits} for sums of at most `max_parties`
    /// updates with coordinates clipped to `[-clip, clip]` after weighting.
    pub fn new(bits: u32, clip: f32, max_examples: u64, max_parties: usize) -> Result<Self, Error> {
        if max_examples == 0 || (max_examples as u128) * (max_parties as u128) >= 1u128 << bits.min(32) {
            return Err(Error::InvalidInput(format!(
                "max_examples {max_examples} × {max_parties} parties does not fit in {bits} bits"
            )));
        }
        Ok(WeightedUpdate { fixed: FixedPoint::new(bits, 0, clip, max_parties)?, max_examples })
    }

    /// The weight a party that trained on `n` examples puts in the sum:
    /// n, at most `max_examples`.
    pub fn weight(&self, n: u64) -> u64 {
        n.min(self.max_examples)
    }

    /// Words per encoded update of a model with `values` values: the
    /// values, the weight, and the training loss and its weight.
    pub fn words(values: usize) -> usize {
        values + 3
    }

    /// The largest absolute error per value of a decoded sum of `n` updates,
    /// as a fraction of Σ nᵢ·Δ (half a quantisation step per party, scaled).
    pub fn max_error(&self, n: usize) -> f64 {
        self.fixed.max_error(n) * self.max_examples as f64
    }

    /// Encodes `n/max_examples · (local − global)` and the weight `n`. A
    /// local model of another shape, or with NaN or infinite values, is
    /// refused: clipping would hide a diverged model inside the sum.
    ///
    /// A party with more rows than `max_examples` weighs as `max_examples`
    /// (see [`WeightedUpdate::weight`]): the coordinator chooses the bound,
    /// so a refusal would tell it whether n passes any bound it likes, and
    /// the sum is there to hide n. The errors say nothing of the values.
    pub fn encode(
        &self,
        global: &Parameters,
        local: &Parameters,
        n: u64,
        train_loss: Option<f64>,
    ) -> Result<Vec<u32>, Error> {
        if n == 0 {
            return Err(Error::InvalidInput("this party trained on no examples".into()));
        }
        let n = self.weight(n);
        let bad = |e: String| Error::InvalidInput(format!("local model after training: {e}"));
        local.check_shapes(&global.spec()).map_err(bad)?;
        let scale = (n as f64 / self.max_examples as f64) as f32;
        // Encoded straight from the two models into the buffer the protocol
        // then masks (or encrypts) in place: no intermediate vectors, and
        // finiteness is checked in the same vectorised pass.
        let mut out = vec![0u32; Self::words(global.num_values())];
        let mut non_finite = false;
        let mut at = 0;
        for (l, g) in local.tensors().iter().zip(global.tensors()) {
            let end = at + l.data.len();
            non_finite |= self.fixed.encode_scaled_delta(&l.data, &g.data, scale, &mut out[at..end]);
            at = end;
        }
        if non_finite {
            // Which value diverged stays here (it depends on the rows).
            return Err(Error::InvalidInput("local model after training has NaN or infinite values".into()));
        }
        out[at] = n as u32;
        // The loss as a fraction of the most any party can put in, in levels.
        if let Some(loss) = train_loss.filter(|l| l.is_finite()) {
            let fraction = (n as f64 / self.max_examples as f64) * (loss.clamp(0.0, LOSS_CAP) / LOSS_CAP);
            out[at + 1] = (fraction * self.fixed.levels() as f64).round() as u32;
            out[at + 2] = n as u32;
        }
        Ok(out)
    }

    /// Decodes the sum of `contributors` encodings into (Σ nᵢ·Δᵢ, Σ nᵢ,
    /// the example-weighted mean training loss of those that reported one).
    pub fn decode(&self, sum: &[u32], contributors: usize) -> Result<(Vec<f64>, f64, Option<f64>), Error> {
        let [values @ .., weight, loss_sum, loss_weight] = sum else {
            return Err(Error::InvalidInput("a sum shorter than its three trailing words".into()));
        };
        let (weight, loss_sum, loss_weight) = (*weight, *loss_sum, *loss_weight);
        // Each honest encoding weighs 1..=max_examples, and the bound was
        // checked to fit the word, so any other total means a contributor's
        // weight word is outside the encoding: refused rather than divided
        // by (found by review). Who it was is hidden by the sum; a total
        // that wrapped back into the range is not caught (no range proofs).
        let (fewest, most) = (contributors as u64, contributors as u64 * self.max_examples);
        if !(fewest..=most).contains(&u64::from(weight)) {
            return Err(Error::InvalidInput(format!(
                "the sum's total weight {weight} cannot come from {contributors} honest encodings (each 1..={}): \
                 a contributor's weight word is outside the encoding (not attributable under a sum)",
                self.max_examples
            )));
        }
        // The loss only if its words could be honest; it is a report, not
        // worth failing the round over.
        let mean_loss = (loss_weight > 0 && loss_weight <= weight)
            .then(|| {
                f64::from(loss_sum) / self.fixed.levels() as f64 * self.max_examples as f64 * LOSS_CAP
                    / f64::from(loss_weight)
            })
            // (Honest rounding can pass the cap by a few levels, not double it.)
            .filter(|l| (0.0..=2.0 * LOSS_CAP).contains(l));
        let total = f64::from(weight);
        let decoded = self.fixed.decode_sum_scaled(values, contributors, self.max_examples as f64)?;
        Ok((decoded, total, mean_loss))
    }
}

/// Distributed-DP noise drawn ahead of rounds (it does not depend on the
/// data), for the clients of every protocol that carries it: filled before
/// training, taken by the round's encoding. Noise drawn for another
/// mechanism (model size, σ, bits) is of no use and is wiped.
#[derive(Default)]
pub(crate) struct NoisePool(std::collections::VecDeque<DdgNoise>);

impl NoisePool {
    /// Keeps only the noise drawn for `ddg`.
    pub(crate) fn keep_for(&mut self, ddg: &Ddg) {
        self.0
            .retain(|n| n.len() == ddg.padded_dim() && n.sigma() == ddg.local_sigma() && n.bits() == ddg.config().bits);
    }

    /// Whether nothing is drawn.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Draws `count` noise vectors for `ddg`.
    pub(crate) fn draw(&mut self, ddg: &Ddg, count: usize) {
        for _ in 0..count {
            match ddg.sample_noise() {
                Ok(n) => self.0.push_back(n),
                Err(_) => break,
            }
        }
    }

    /// Before training from `global` under the job's distributed DP: keeps
    /// what fits the spec's mechanism and, once it is used up, draws
    /// `noise_rounds_ahead` rounds of it (at most 1 GiB, whatever the
    /// model's size). Returns the mechanism's words per update (its padded
    /// length, which depends only on the model's shape); `None` without
    /// distributed DP or for a model it cannot encode.
    pub(crate) fn prepare(&mut self, job: &super::JobFacts, global: &Parameters) -> Option<usize> {
        let template = job.distributed_dp.as_ref()?;
        let adaptive = job.adaptive_clip.as_ref();
        let noisy = NoisyUpdate::with_clip(template, adaptive, template.clip, &job.job_id, 0, global).ok()?;
        let ddg = noisy.mechanism();
        self.keep_for(ddg);
        if self.0.is_empty() {
            let fits = ((1usize << 30) / (std::mem::size_of::<u32>() * ddg.padded_dim())).max(1);
            self.draw(ddg, job.noise_rounds_ahead.clamp(1, fits));
        }
        Some(noisy.words())
    }

    /// The round's noise for `noisy`: drawn ahead if any fits, else now.
    pub(crate) fn take_for(&mut self, noisy: &NoisyUpdate) -> Result<DdgNoise, Error> {
        self.keep_for(noisy.mechanism());
        match self.0.pop_front() {
            Some(n) => Ok(n),
            None => noisy.sample_noise(),
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Noise vectors drawn for one round's encoding (inside the round),
    /// not into a pool ahead of it.
    pub(crate) static INLINE_NOISE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// An update under party-level DP with distributed noise (the distributed
/// discrete Gaussian of Kairouz, Liu and Steinke, [`confide_dp::ddg`]):
/// `local − global` over the trained tensors, rotated, clipped to the
/// spec's L2 norm, rounded onto the lattice, plus the party's own share of
/// the noise, modulo 2^b. Every update weighs 1 and carries no loss: the
/// sum reveals Σ clip(Δᵢ) plus noise and nothing else. The frozen input
/// standardisation (`input.mean`, `input.std`) is left out: it is not
/// trained, and noise on it would only be thrown away.
pub struct NoisyUpdate {
    ddg: Ddg,
    /// The shared rotation's seed: a hash of the job and round (public; it
    /// spreads the vector so that rounding and the wrap-around behave).
    rotation: [u8; 32],
    /// Per tensor of the model: its length and whether it is in the vector.
    layout: Vec<(usize, bool)>,
    /// Adaptive clipping: the round's clip C and the weight κ of the
    /// appended count coordinate (b − ½)·κ.
    count: Option<(f64, f64)>,
}

impl std::fmt::Debug for NoisyUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoisyUpdate").field("config", self.ddg.config()).finish_non_exhaustive()
    }
}

impl NoisyUpdate {
    /// The mechanism of `template` (from the spec) for round `round` of job
    /// `job_id`, training from `global`, with a fixed clip.
    pub fn new(template: &DdgConfig, job_id: &str, round: u32, global: &Parameters) -> Result<Self, Error> {
        Self::with_clip(template, None, template.clip, job_id, round, global)
    }

    /// [`NoisyUpdate::new`] with this round's `clip` and, under adaptive
    /// clipping, the count of unclipped updates appended (the mechanism then
    /// clips at the joint norm C').
    pub fn with_clip(
        template: &DdgConfig,
        adaptive: Option<&AdaptiveClip>,
        clip: f64,
        job_id: &str,
        round: u32,
        global: &Parameters,
    ) -> Result<Self, Error> {
        let layout: Vec<(usize, bool)> =
            global.tensors().iter().map(|t| (t.data.len(), !is_input_standardisation(&t.name))).collect();
        let trained: usize = layout.iter().filter(|(_, on)| *on).map(|(n, _)| n).sum();
        let (dim, joint_clip, count) = match adaptive {
            None => (trained, clip, None),
            Some(a) => {
                let (joint, kappa) = a
                    .joint(clip, template.noise_multiplier)
                    .ok_or_else(|| Error::InvalidInput(format!("adaptive clipping: no joint clip for clip {clip}")))?;
                (trained + 1, joint, Some((clip, kappa)))
            }
        };
        // The noise is accounted for models up to the template's size.
        let most = template.dim.min(MAX_PADDED_DIM);
        if trained == 0 || dim > most {
            return Err(Error::InvalidInput(format!(
                "the model has {trained} trained values ({dim} with adaptive clipping's count); the job's \
                 distributed DP is accounted for 1 to {most} \
                 (dp.max_model_values)"
            )));
        }
        let ddg = Ddg::new(DdgConfig { dim, clip: joint_clip, ..*template })
            .map_err(|e| Error::InvalidInput(format!("distributed DP: {e}")))?;
        let mut h = blake3::Hasher::new_derive_key("confide ddg rotation v1");
        h.update(&(job_id.len() as u64).to_le_bytes());
        h.update(job_id.as_bytes());
        h.update(&round.to_le_bytes());
        Ok(NoisyUpdate { ddg, rotation: *h.finalize().as_bytes(), layout, count })
    }

    /// Words per encoded update: the rotated length (`Ddg::padded_dim_for`).
    pub fn words(&self) -> usize {
        self.ddg.padded_dim()
    }

    /// A hash of every parameter of the mechanism (clip, noise, bits,
    /// parties, honest parties, rounding, length, the rotation's block):
    /// what a round binds, so that parties holding different `[dp]`
    /// settings, or binaries that rotate differently, cannot complete one.
    pub fn digest(&self) -> [u8; 32] {
        let c = self.ddg.config();
        // v2: the rotation in blocks (v1 rotated the whole vector, padded
        // to a power of two).
        let mut h = blake3::Hasher::new_derive_key("confide ddg config v2");
        for v in [confide_dp::ddg::ROTATION_BLOCK as u64, self.ddg.padded_dim() as u64] {
            h.update(&v.to_le_bytes());
        }
        for v in [c.clip.to_bits(), c.noise_multiplier.to_bits(), c.beta.to_bits(), c.k_stddevs.to_bits()] {
            h.update(&v.to_le_bytes());
        }
        for v in [c.dim as u64, u64::from(c.bits), c.max_parties as u64, c.honest_parties as u64] {
            h.update(&v.to_le_bytes());
        }
        h.update(&self.rotation);
        *h.finalize().as_bytes()
    }

    /// The mechanism.
    pub fn mechanism(&self) -> &Ddg {
        &self.ddg
    }

    /// Draws this party's noise for the round (data-independent: it may be
    /// drawn ahead, see [`super::AggregationClient::prepare`]).
    pub fn sample_noise(&self) -> Result<DdgNoise, Error> {
        #[cfg(test)]
        INLINE_NOISE.with(|c| c.set(c.get() + 1));
        self.ddg.sample_noise().map_err(|e| Error::InvalidInput(format!("distributed DP noise: {e}")))
    }

    /// Encodes `local − global` with `noise` (consumed). A local model of
    /// another shape is refused; one with NaN or infinite values (a
    /// diverged model) is sent as no update, without an error, since
    /// whether an error is sent must not depend on the rows.
    pub fn encode(&self, global: &Parameters, local: &Parameters, noise: DdgNoise) -> Result<Vec<u32>, Error> {
        let bad = |e: String| Error::InvalidInput(format!("local model after training: {e}"));
        local.check_shapes(&global.spec()).map_err(bad)?;
        let trained =
            || local.tensors().iter().zip(global.tensors()).filter(|(_, g)| !is_input_standardisation(&g.name));
        let dim = self.ddg.config().dim;
        let counted = usize::from(self.count.is_some());
        let values: usize = trained().map(|(l, _)| l.data.len()).sum();
        if values + counted != dim {
            return Err(Error::InvalidInput(format!("{values} trained values for a mechanism of {}", dim - counted)));
        }
        let tensors: Vec<(&[f32], &[f32])> = trained().map(|(l, g)| (&l.data[..], &g.data[..])).collect();
        let mut source = UpdateSource {
            lens: tensors.iter().map(|(l, _)| l.len()).collect(),
            tensors,
            clip: self.clip(),
            kappa: self.count.map(|(_, kappa)| kappa),
            cursor: TensorCursor::default(),
            pass: Pass::Difference { norm_sq: 0.0 },
        };
        let dp = |e: confide_dp::Error| Error::InvalidInput(format!("distributed DP: {e}"));
        // The rounding's coins: a CSPRNG from the OS, like the noise.
        let mut rng = confide_dp::sampler::os_seeded_rng().map_err(dp)?;
        self.ddg.encode_from(&mut source, noise, &self.rotation, &mut rng).map_err(dp)
    }

    /// The modular sum of the contributors' words → Σ clip(Δᵢ) + noise per
    /// model value (0 for the frozen tensors).
    pub fn decode(&self, sum: &[u32]) -> Result<Vec<f64>, Error> {
        self.decode_with_count(sum, 0).map(|(values, _)| values)
    }

    /// [`NoisyUpdate::decode`] and, under adaptive clipping, the noisy count
    /// of the `contributors`' updates that fitted within the clip.
    pub fn decode_with_count(&self, sum: &[u32], contributors: usize) -> Result<(Vec<f64>, Option<f64>), Error> {
        // The trained values go straight to their tensors' places in the
        // model's layout (the frozen tensors stay 0), chunk by chunk as the
        // mechanism decodes them; the count coordinate, last, aside.
        let total: usize = self.layout.iter().map(|(n, _)| n).sum();
        let mut out = vec![0.0; total];
        // Per trained tensor: its length and where it starts in the layout.
        let (mut lens, mut starts) = (Vec::new(), Vec::new());
        let mut layout_at = 0;
        for &(n, on) in &self.layout {
            if on {
                lens.push(n);
                starts.push(layout_at);
            }
            layout_at += n;
        }
        let mut count_value = None;
        let mut cursor = TensorCursor::default();
        self.ddg
            .decode_with(sum, &self.rotation, |at, values| {
                cursor.runs(&lens, at, values.len(), |run, r| match run {
                    Some((t, offset)) => out[starts[t] + offset..][..r.len()].copy_from_slice(&values[r]),
                    None => count_value = Some(values[r.start]),
                });
            })
            .map_err(|e| Error::InvalidInput(format!("distributed DP: {e}")))?;
        let count = match self.count {
            Some((_, kappa)) => count_value.map(|c| c / kappa + contributors as f64 / 2.0),
            None => None,
        };
        Ok((out, count))
    }

    /// The round's clip C (of the update, before the count coordinate).
    pub fn clip(&self) -> f64 {
        self.count.map_or(self.ddg.config().clip, |(c, _)| c)
    }
}

/// A party's clipped update, written straight into the mechanism's
/// rotation buffer: `local − global` over the trained tensors, then, under
/// adaptive clipping, the count coordinate (b − ½)·κ, b = whether the
/// update fitted within the clip.
///
/// One pass over the two models in the common case: the difference is
/// written unscaled while its norm is summed (in f64, where no pair of
/// finite f32 values overflows), and the clipping factor goes to the
/// mechanism as the source's scale, which it applies exactly as it rounds
/// (the rotation is linear). The count, written last, is divided by that
/// factor so that it comes out as (b − ½)·κ. Whether an error is sent must
/// not depend on the rows, so the rare updates this cannot carry are
/// written again ([`Source::scale`] → `None`): a non-finite update (a
/// diverged model) as no update, and one whose difference or count would
/// not fit in f32 unscaled already scaled, as before this pass existed.
struct UpdateSource<'a> {
    tensors: Vec<(&'a [f32], &'a [f32])>,
    lens: Vec<usize>,
    /// The model part's clip.
    clip: f64,
    /// Adaptive clipping's κ, when the vector carries the count.
    kappa: Option<f64>,
    cursor: TensorCursor,
    pass: Pass,
}

/// What an [`UpdateSource`] writes.
#[derive(Clone, Copy)]
enum Pass {
    /// The unscaled difference, summing its norm².
    Difference { norm_sq: f64 },
    /// Written again: the difference times this factor (0 for a diverged
    /// model: zeros), the count as is.
    Scaled { factor: f64, fitted: bool },
}

/// Unscaled differences this far from zero (in f64) are written scaled
/// instead: their square sums, and a count divided by a tiny clipping
/// factor, stay far inside f32 and f64.
const UNSCALED_LIMIT: f64 = 1e30;

impl UpdateSource<'_> {
    /// The clipping factor for a model part of norm² `norm_sq`, and whether
    /// it fitted (a hair inside the clip, against rounding).
    fn clipping(&self, norm_sq: f64) -> (f64, bool) {
        let norm = norm_sq.sqrt();
        if norm <= self.clip { (1.0, true) } else { (self.clip * (1.0 - 1e-6) / norm, false) }
    }

    /// The count coordinate's value: (b − ½)·κ.
    fn count(&self, fitted: bool) -> f64 {
        (f64::from(u8::from(fitted)) - 0.5) * self.kappa.unwrap_or(0.0)
    }
}

impl confide_dp::ddg::Source for UpdateSource<'_> {
    fn write(&mut self, at: usize, out: &mut [f32]) -> Result<(), confide_dp::Error> {
        let (tensors, lens) = (&self.tensors, &self.lens);
        let mut pass = self.pass;
        let mut count_at = None;
        self.cursor.runs(lens, at, out.len(), |run, r| match (run, &mut pass) {
            (Some((t, offset)), Pass::Difference { norm_sq }) => {
                let (l, g) = tensors[t];
                *norm_sq += scaled_difference_into(&mut out[r], &l[offset..], &g[offset..], 1.0);
            }
            // A diverged model (factor 0) leaves the zeros `out` holds.
            (Some((t, offset)), Pass::Scaled { factor, .. }) if *factor != 0.0 => {
                let (l, g) = tensors[t];
                scaled_difference_into(&mut out[r], &l[offset..], &g[offset..], *factor);
            }
            (Some(_), Pass::Scaled { .. }) => {}
            (None, _) => count_at = Some(r.start),
        });
        // The count comes after the whole model part: its norm is known.
        if let Some(i) = count_at {
            out[i] = match pass {
                Pass::Difference { norm_sq } => {
                    let (factor, fitted) = self.clipping(norm_sq);
                    self.count(fitted) / factor
                }
                Pass::Scaled { fitted, .. } => self.count(fitted),
            } as f32;
        }
        self.pass = pass;
        Ok(())
    }

    fn scale(&mut self) -> Option<f64> {
        match self.pass {
            Pass::Difference { norm_sq } => {
                let (factor, fitted) = self.clipping(norm_sq);
                let count = self.count(fitted) / factor;
                if norm_sq.is_finite() && norm_sq.sqrt() < UNSCALED_LIMIT && count.abs() < UNSCALED_LIMIT {
                    return Some(factor);
                }
                // A diverged model is no update (it fitted: zero is within
                // the clip); a huge one is written scaled.
                self.pass = if norm_sq.is_finite() {
                    Pass::Scaled { factor, fitted }
                } else {
                    Pass::Scaled { factor: 0.0, fitted: true }
                };
                None
            }
            Pass::Scaled { .. } => Some(1.0),
        }
    }
}

/// Where a position of the trained vector (the trained tensors end to
/// end, then adaptive clipping's count coordinate) is, remembered from the
/// last one asked: the mechanism fills and decodes the vector in
/// consecutive chunks, in order.
#[derive(Default)]
struct TensorCursor {
    tensor: usize,
    start: usize,
}

impl TensorCursor {
    /// Splits positions `at..at + len` into runs: `run(Some((tensor,
    /// offset)), range)` for values of one trained tensor (of lengths
    /// `lens`) from `offset`, at `range` of the chunk; `run(None, range)`
    /// for a single position past the last tensor (the count coordinate).
    fn runs(
        &mut self,
        lens: &[usize],
        at: usize,
        len: usize,
        mut run: impl FnMut(Option<(usize, usize)>, Range<usize>),
    ) {
        let mut i = 0;
        while i < len {
            match self.find(lens, at + i) {
                Some((t, offset)) => {
                    let take = (lens[t] - offset).min(len - i);
                    run(Some((t, offset)), i..i + take);
                    i += take;
                }
                None => {
                    run(None, i..i + 1);
                    i += 1;
                }
            }
        }
    }

    /// The tensor holding position `index` and the offset in it.
    fn find(&mut self, lens: &[usize], index: usize) -> Option<(usize, usize)> {
        if index < self.start {
            *self = TensorCursor::default();
        }
        while let Some(&n) = lens.get(self.tensor) {
            if index < self.start + n {
                return Some((self.tensor, index - self.start));
            }
            self.start += n;
            self.tensor += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::Tensor;
    use confide_algorithms::trainer::INPUT_MEAN;
    use proptest::prelude::*;

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    #[test]
    fn refuses_diverged_models_and_bad_counts() {
        let enc = WeightedUpdate::new(32, 1.0, 100, 10).unwrap();
        let g = params(&[0.0, 0.0]);
        let err = enc.encode(&g, &params(&[f32::NAN, 0.0]), 5, None).unwrap_err().to_string();
        assert_eq!(err, "invalid input: local model after training has NaN or infinite values", "no index, no value");
        assert!(enc.encode(&g, &params(&[0.0]), 5, None).is_err());
        assert!(enc.encode(&g, &params(&[0.0, 0.0]), 0, None).is_err());
        // More rows than max_examples weigh as max_examples: no refusal that
        // would tell the coordinator n passed the bound it chose.
        let local = params(&[0.5, -0.5]);
        assert_eq!(
            enc.encode(&g, &local, 4821, Some(0.3)).unwrap(),
            enc.encode(&g, &local, 100, Some(0.3)).unwrap(),
            "saturated at the bound"
        );
        assert!(WeightedUpdate::new(16, 1.0, 100_000, 3).is_err(), "weights overflow 16 bits");
    }

    /// A decoded total weight no honest encodings could give (a
    /// contributor's weight word outside 1..=max_examples) is refused, not
    /// divided by; loss words that could not be honest drop the loss only.
    #[test]
    fn a_sum_whose_weight_no_honest_encodings_give_is_refused() {
        let enc = WeightedUpdate::new(32, 1.0, 100, 10).unwrap();
        let g = params(&[0.0, 0.0]);
        let add = |words: &[Vec<u32>]| -> Vec<u32> {
            (0..words[0].len()).map(|i| words.iter().fold(0u32, |a, w| a.wrapping_add(w[i]))).collect()
        };
        let honest: Vec<Vec<u32>> =
            (1..=3).map(|n| enc.encode(&g, &params(&[0.1, -0.1]), 10 * n, Some(0.5)).unwrap()).collect();
        let (_, total, loss) = enc.decode(&add(&honest), 3).unwrap();
        assert_eq!(total, 60.0);
        assert!(loss.is_some_and(|l| (l - 0.5).abs() < 1e-3), "{loss:?}");
        let weight_at = honest[0].len() - 3;
        // Totals of 1030, 2^32 − 29 and 1 (wrapped below the count).
        for bad in [1_000u32, u32::MAX - 58, u32::MAX - 28] {
            let mut forged = honest.clone();
            forged[2][weight_at] = bad;
            let err = enc.decode(&add(&forged), 3).unwrap_err().to_string();
            assert!(err.contains("cannot come from 3 honest encodings"), "{bad}: {err}");
        }
        let mut forged = honest.clone();
        forged[2][weight_at + 2] = 1_000_000;
        let (_, total, loss) = enc.decode(&add(&forged), 3).unwrap();
        assert_eq!((total, loss), (60.0, None), "a loss weight above the total drops the loss");
    }

    /// Distributed DP: a model larger than the spec accounts for is
    /// refused by name; the frozen standardisation is not in the vector
    /// and decodes as no change.
    #[test]
    fn a_noisy_update_refuses_models_beyond_its_bound_and_leaves_the_frozen_tensors_out() {
        let template = DdgConfig {
            clip: 1.0,
            noise_multiplier: 1e-3,
            dim: 8,
            bits: 32,
            max_parties: 3,
            honest_parties: 3,
            beta: 0.6,
            k_stddevs: 4.0,
        };
        let err = NoisyUpdate::new(&template, "j", 1, &params(&[0.0; 9])).unwrap_err().to_string();
        assert!(err.contains("dp.max_model_values") && err.contains("9 trained values"), "{err}");
        let global = Parameters::new(vec![
            Tensor { name: INPUT_MEAN.into(), shape: vec![4], data: vec![0.0; 4] },
            Tensor { name: "w".into(), shape: vec![8], data: vec![0.0; 8] },
        ])
        .unwrap();
        let enc = NoisyUpdate::new(&template, "j", 1, &global).unwrap();
        assert_eq!(enc.words(), 8, "only the 8 trained values");
        let mut local = global.clone();
        for (name, v) in local.values_mut() {
            v.iter_mut().for_each(|x| *x = if name == "w" { 0.1 } else { 5.0 });
        }
        let words = enc.encode(&global, &local, enc.sample_noise().unwrap()).unwrap();
        let back = enc.decode(&words).unwrap();
        assert_eq!(&back[..4], &[0.0; 4]);
        assert!(back[4..].iter().all(|v| (v - 0.1).abs() < 1e-2), "{back:?}");
        // A coordinator's model at f32's edge, or a diverged local model:
        // no error (its presence would depend on the rows), no update.
        let mut edge = global.clone();
        for (name, v) in edge.values_mut() {
            if name == "w" {
                v.iter_mut().for_each(|x| *x = -3e38);
            }
        }
        let mut far = edge.clone();
        for (_, v) in far.values_mut() {
            v.iter_mut().for_each(|x| *x = 3e38);
        }
        let words = enc.encode(&edge, &far, enc.sample_noise().unwrap()).unwrap();
        let back = enc.decode(&words).unwrap();
        assert!(back[4..].iter().all(|v| (v - 1.0 / 8f64.sqrt()).abs() < 1e-2), "clipped to norm 1: {back:?}");
        let mut nan = global.clone();
        for (_, v) in nan.values_mut() {
            v[0] = f32::NAN;
        }
        let words = enc.encode(&global, &nan, enc.sample_noise().unwrap()).unwrap();
        assert!(enc.decode(&words).unwrap().iter().all(|v| v.abs() < 1e-2));
        // Adaptive clipping: the count of updates within the clip comes out
        // of the sum (two of four here), the updates clipped.
        let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 0.01 };
        let counted =
            NoisyUpdate::with_clip(&DdgConfig { dim: 16, ..template }, Some(&adaptive), 0.5, "j", 1, &global).unwrap();
        let modulus_mask = u32::MAX;
        let mut sum = vec![0u32; counted.words()];
        for norm in [0.1f32, 0.4, 2.0, 9.0] {
            let mut l = global.clone();
            for (name, v) in l.values_mut() {
                if name == "w" {
                    v.iter_mut().for_each(|x| *x = norm / 8f32.sqrt());
                }
            }
            let words = counted.encode(&global, &l, counted.sample_noise().unwrap()).unwrap();
            sum.iter_mut().zip(&words).for_each(|(s, w)| *s = s.wrapping_add(*w) & modulus_mask);
        }
        let (values, count) = counted.decode_with_count(&sum, 4).unwrap();
        assert!((count.unwrap() - 2.0).abs() < 0.1, "{count:?}");
        let per_value = (0.1 + 0.4 + 0.5 + 0.5) / 8f64.sqrt();
        assert!(values[4..].iter().all(|v| (v - per_value).abs() < 1e-2), "{values:?}");
        // The updates written a second time carry the count too: a diverged
        // model as no update that fitted, one too large to write unscaled
        // (its difference overflows f32) clipped, not fitted.
        for (local, update, fitted) in [(&nan, 0.0, 1.0), (&far, 0.5 / 8f64.sqrt(), 0.0)] {
            let base = if fitted == 0.0 { &edge } else { &global };
            let words = counted.encode(base, local, counted.sample_noise().unwrap()).unwrap();
            let (values, count) = counted.decode_with_count(&words, 1).unwrap();
            assert!((count.unwrap() - fitted).abs() < 0.1, "{count:?}");
            assert!(values[4..].iter().all(|v| (v - update).abs() < 1e-2), "{values:?}");
        }
        // Another round rotates with another seed: its mechanism differs.
        assert_ne!(NoisyUpdate::new(&template, "j", 2, &global).unwrap().digest(), enc.digest());
    }

    /// The mechanism reads the difference block by block across tensor
    /// boundaries (4,096 values a block; a frozen tensor between two
    /// trained ones; the count coordinate in the last block): each value
    /// decodes to its own clipped difference, below and above the clip,
    /// with and without adaptive clipping's count; and the updates written
    /// a second time (diverged, too large for f32 unscaled, a count too
    /// large unscaled) across blocks too.
    #[test]
    fn the_difference_is_read_across_blocks_and_tensors() {
        // 5,508 trained values (the count mid-block); then 4,096, which puts
        // the count alone at the start of the second block (its value then
        // rests on the norm summed over the first); then 40,000, three
        // rotation blocks (49,152 words, not a power of two).
        for shapes in [
            &[("w1", 3001), (INPUT_MEAN, 100), ("w2", 2500), ("b", 7)][..],
            &[("w", 4000), ("b", 96)],
            &[("w", 39_000), ("b", 1000)],
        ] {
            difference_read_across_blocks(shapes);
            written_again_across_blocks(shapes);
        }
    }

    /// A model of `shapes` end to end, value i = f(i).
    fn layered(shapes: &[(&str, usize)], f: &dyn Fn(usize) -> f32) -> Parameters {
        let mut at = 0;
        let tensors = shapes
            .iter()
            .map(|&(name, n)| {
                let data = (at..at + n).map(f).collect();
                at += n;
                Tensor { name: name.into(), shape: vec![n], data }
            })
            .collect();
        Parameters::new(tensors).unwrap()
    }

    /// A mechanism of `dim` values with noise small enough to check each
    /// decoded value (z = 10^-4, clip 1, three parties, 32 bits).
    fn low_noise(dim: usize) -> DdgConfig {
        DdgConfig {
            clip: 1.0,
            noise_multiplier: 1e-4,
            dim,
            bits: 32,
            max_parties: 3,
            honest_parties: 3,
            beta: 0.6,
            k_stddevs: 4.0,
        }
    }

    fn written_again_across_blocks(shapes: &[(&str, usize)]) {
        let model = |f: &dyn Fn(usize) -> f32| layered(shapes, f);
        let global = model(&|i| (i as f32 * 0.01).sin());
        let trained: usize = shapes.iter().filter(|(name, _)| *name != INPUT_MEAN).map(|(_, n)| n).sum();
        let frozen: Vec<bool> =
            shapes.iter().flat_map(|&(name, n)| std::iter::repeat_n(name == INPUT_MEAN, n)).collect();
        let template = low_noise(trained + 1);
        let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 0.01 };
        let spread = 1.0 / (trained as f32).sqrt();
        let nan_at = trained / 2;
        let cases: [(&str, Option<&AdaptiveClip>, Parameters, f64); 4] = [
            ("diverged", None, model(&|i| if i == nan_at { f32::NAN } else { 1.0 }), 0.0),
            ("diverged, counted", Some(&adaptive), model(&|i| if i == nan_at { f32::INFINITY } else { 1.0 }), 0.0),
            ("beyond f32", None, model(&|_| 1e36), spread.into()),
            ("beyond f32, counted", Some(&adaptive), model(&|_| -1e36), (-spread).into()),
        ];
        for (what, counted, local, per_value) in cases {
            let enc = NoisyUpdate::with_clip(&template, counted, 1.0, "j", 1, &global).unwrap();
            let words = enc.encode(&global, &local, enc.sample_noise().unwrap()).unwrap();
            let (back, count) = enc.decode_with_count(&words, 1).unwrap();
            for (i, (got, &skip)) in back.iter().zip(&frozen).enumerate() {
                let want = if skip { 0.0 } else { per_value };
                assert!((got - want).abs() < 2e-3, "{what}, [{i}]: {got} vs {want}");
            }
            if counted.is_some() {
                let fitted = if per_value == 0.0 { 1.0 } else { 0.0 };
                assert!((count.unwrap() - fitted).abs() < 0.1, "{what}: count {count:?}");
            }
        }
    }

    fn difference_read_across_blocks(shapes: &[(&str, usize)]) {
        let model = |f: &dyn Fn(usize) -> f32| layered(shapes, f);
        let global = model(&|i| (i as f32 * 0.01).sin());
        let trained: usize = shapes.iter().filter(|(name, _)| *name != INPUT_MEAN).map(|(_, n)| n).sum();
        let template = low_noise(trained + 1);
        let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 0.01 };
        for counted in [None, Some(&adaptive)] {
            for size in [0.5f32, 4.0] {
                // Differences of norm ≈ `size`, each value distinct.
                let step = |i: usize| size * ((i % 97) as f32 - 48.0) / 28.0 / (trained as f32).sqrt();
                let local = model(&|i| (i as f32 * 0.01).sin() + step(i));
                let enc = NoisyUpdate::with_clip(&template, counted, 1.0, "j", 1, &global).unwrap();
                assert_eq!(enc.words(), Ddg::padded_dim_for(trained + usize::from(counted.is_some())));
                let words = enc.encode(&global, &local, enc.sample_noise().unwrap()).unwrap();
                let (back, count) = enc.decode_with_count(&words, 1).unwrap();
                let mut want: Vec<f64> = Vec::new();
                let mut norm_sq = 0.0;
                for ((l, g), &(name, _)) in local.tensors().iter().zip(global.tensors()).zip(shapes) {
                    for (&a, &b) in l.data.iter().zip(&g.data) {
                        let d = f64::from(a) - f64::from(b);
                        want.push(if name == INPUT_MEAN { f64::NAN } else { d });
                        if name != INPUT_MEAN {
                            norm_sq += d * d;
                        }
                    }
                }
                let factor = (1.0 / norm_sq.sqrt()).min(1.0);
                for (i, (got, w)) in back.iter().zip(&want).enumerate() {
                    let w = if w.is_nan() { 0.0 } else { w * factor };
                    assert!((got - w).abs() < 2e-3, "size {size}, [{i}]: {got} vs {w}");
                }
                if counted.is_some() {
                    let fitted = if size < 1.0 { 1.0 } else { 0.0 };
                    assert!((count.unwrap() - fitted).abs() < 0.1, "size {size}: count {count:?}");
                }
            }
        }
    }

    /// A count that, divided by the clipping factor, would pass 10^30 while
    /// the norm does not (a large κ against the clip: σ_b near z/2) has the
    /// update written a second time, scaled, with the count as it is; the
    /// first pass wrote the difference unscaled and the count divided.
    /// (Through the whole mechanism such a κ makes the noise too large to
    /// check values against, so the source is checked alone.)
    #[test]
    fn a_count_too_large_unscaled_is_written_again_scaled() {
        use confide_dp::ddg::Source as _;
        let n = 5000;
        let global: Vec<f32> = (0..n).map(|i| (i as f32).sin()).collect();
        let big = 1e25 / (n as f32).sqrt();
        let local: Vec<f32> = global.iter().map(|g| g + big).collect();
        let kappa = 1e6;
        let mut source = UpdateSource {
            tensors: vec![(&local[..], &global[..])],
            lens: vec![n],
            clip: 1.0,
            kappa: Some(kappa),
            cursor: TensorCursor::default(),
            pass: Pass::Difference { norm_sq: 0.0 },
        };
        let write = |source: &mut UpdateSource<'_>| {
            let mut out = vec![0.0f32; n + 1];
            for (at, block) in (0..n + 1).step_by(4096).zip(out.chunks_mut(4096)) {
                source.write(at, block).unwrap();
            }
            out
        };
        let first = write(&mut source);
        let norm = f64::from(big) * (n as f64).sqrt();
        let factor = (1.0 - 1e-6) / norm;
        assert!((f64::from(first[7]) / f64::from(big) - 1.0).abs() < 1e-6, "unscaled: {}", first[7]);
        let divided = -0.5 * kappa / factor;
        assert!(divided < -1e30 && (f64::from(first[n]) / divided - 1.0).abs() < 1e-6, "{} vs {divided}", first[n]);
        assert_eq!(source.scale(), None, "written again");
        let second = write(&mut source);
        assert_eq!(source.scale(), Some(1.0));
        assert!((f64::from(second[7]) - f64::from(big) * factor).abs() < 1e-9, "scaled: {}", second[7]);
        assert_eq!(second[n], (-0.5 * kappa) as f32, "the count as it is");
    }

    /// The decoded values go to their tensors' places, across the
    /// decoder's chunks, around frozen tensors in the middle and at the
    /// end, with and without adaptive clipping's count coordinate: the
    /// same as the mechanism's own decoding spread out by the layout.
    #[test]
    fn decoded_values_land_in_their_tensors_places() {
        use confide_algorithms::trainer::INPUT_STD;
        use rand::{RngCore as _, SeedableRng as _};
        let tensor = |name: &str, n: usize| Tensor { name: name.into(), shape: vec![n], data: vec![0.0; n] };
        // Frozen tensors in the middle and at the end, or first; a tensor
        // boundary inside a chunk (3000) or exactly on one (2048, 4096: the
        // decoder's chunks are 2048 values), and then the count coordinate
        // alone in its chunk.
        let layouts = [
            vec![tensor("a", 3000), tensor(INPUT_MEAN, 5), tensor("b", 2500), tensor(INPUT_STD, 5)],
            vec![tensor(INPUT_MEAN, 5), tensor("a", 2048), tensor(INPUT_STD, 5), tensor("b", 2048)],
        ];
        let template = DdgConfig {
            clip: 1.0,
            noise_multiplier: 1e-3,
            dim: 8192,
            bits: 20,
            max_parties: 3,
            honest_parties: 3,
            beta: 0.6,
            k_stddevs: 4.0,
        };
        let adaptive = AdaptiveClip { target_quantile: 0.5, learning_rate: 0.2, count_stddev: 0.01 };
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(5);
        for layout in layouts {
            let global = Parameters::new(layout).unwrap();
            for adaptive in [None, Some(&adaptive)] {
                let enc = NoisyUpdate::with_clip(&template, adaptive, 0.5, "j", 3, &global).unwrap();
                let sum: Vec<u32> = (0..enc.words()).map(|_| rng.next_u32() & 0xF_FFFF).collect();
                let flat = enc.ddg.decode(&sum, &enc.rotation).unwrap();
                let (values, count) = enc.decode_with_count(&sum, 3).unwrap();
                // The trained values in order, zeros where the frozen tensors are.
                let mut expected = Vec::new();
                let mut at = 0;
                for t in global.tensors() {
                    if is_input_standardisation(&t.name) {
                        expected.extend(std::iter::repeat_n(0.0, t.data.len()));
                    } else {
                        expected.extend_from_slice(&flat[at..at + t.data.len()]);
                        at += t.data.len();
                    }
                }
                assert_eq!(values, expected);
                match adaptive {
                    None => assert_eq!((count, flat.len()), (None, at)),
                    Some(_) => {
                        let (_, kappa) = enc.count.unwrap();
                        assert_eq!(flat.len(), at + 1);
                        assert_eq!(count, Some(flat[at] / kappa + 1.5));
                    }
                }
            }
        }
    }

    proptest! {
        #[test]
        fn the_sum_of_encodings_decodes_to_the_weighted_delta_sum_and_mean_loss(
            parties in proptest::collection::vec(
                (1u64..=1000, proptest::collection::vec(-0.5f32..0.5, 4), proptest::option::of(0.0f64..150.0)),
                1..12,
            ),
        ) {
            let enc = WeightedUpdate::new(32, 1.0, 1000, 12).unwrap();
            let g = params(&[0.1, -0.2, 0.0, 0.3]);
            let mut sum = vec![0u32; WeightedUpdate::words(4)];
            for (n, local, loss) in &parties {
                let words = enc.encode(&g, &params(local), *n, *loss).unwrap();
                for (s, w) in sum.iter_mut().zip(words) { *s = s.wrapping_add(w); }
            }
            let (delta, total, mean_loss) = enc.decode(&sum, parties.len()).unwrap();
            prop_assert_eq!(total, parties.iter().map(|(n, _, _)| *n as f64).sum::<f64>());
            // The example-weighted mean of the reported losses (capped), to the quantisation.
            let reported: Vec<(f64, f64)> =
                parties.iter().filter_map(|(n, _, l)| l.map(|l| (*n as f64, l.min(LOSS_CAP)))).collect();
            let weight: f64 = reported.iter().map(|(n, _)| n).sum();
            match mean_loss {
                None => prop_assert!(reported.is_empty()),
                Some(m) => {
                    let exact = reported.iter().map(|(n, l)| n * l).sum::<f64>() / weight;
                    let step = 1000.0 * LOSS_CAP / enc.fixed.levels() as f64;
                    prop_assert!((m - exact).abs() <= parties.len() as f64 * step / weight + 1e-9, "{m} vs {exact}");
                }
            }
            for j in 0..4 {
                let exact: f64 = parties.iter().map(|(n, l, _)| *n as f64 * f64::from(l[j] - g.tensors()[0].data[j])).sum();
                // Quantisation, plus the f32 rounding of n/N·Δ before encoding.
                let bound = enc.max_error(parties.len()) + parties.len() as f64 * 1e-4;
                prop_assert!((delta[j] - exact).abs() <= bound, "{} vs {}", delta[j], exact);
            }
        }
    }
}
