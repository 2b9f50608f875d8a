//! Example-level DP for local training (DP-SGD, Abadi et al. 2016) with
//! exact noise: the pieces a trainer needs, independent of how it computes
//! gradients.
//!
//! Each step, a trainer
//! 1. draws a Poisson sample of its rows ([`DpSgd::poisson_sample`]: each
//!    row independently with probability q, from a CSPRNG);
//! 2. computes each sampled row's gradient, scales it by
//!    [`DpSgd::clip_factor`] so that its L2 norm is at most
//!    [`DpSgd::clip_norm`], and sums the scaled gradients in `f64`;
//! 3. calls [`DpSgd::privatize`], which puts the sum on the lattice γ·Z^d
//!    (γ = C / 2^20 for the clipping norm C, or a coarser 2^16–2^19 for
//!    noise multipliers above 64), adds exact discrete Gaussian
//!    noise N_Z(0, σ_int²) per coordinate, and divides by the expected batch
//!    size (a public constant, as Opacus's `expected_batch_size`: dividing
//!    by the sample's real size would reveal it).
//!
//! Why the lattice sensitivity is at most 2^20 = C/γ (2^bits in general):
//! adding or removing one row changes the exact sum by one clipped gradient,
//! of norm at most `clip_norm` = C − 2γ√d. Rounding each coordinate to the
//! nearest lattice point moves the difference of two sums by less than one
//! unit per coordinate, √d in L2. The floating-point summation's own error
//! must fit the second √d, that is at most 1/2 unit per coordinate for each
//! of the two sums. Per coordinate, with u = 2^-53, each row's value at most
//! C = 2^20 units and n rows: a row's value is a product scaled by its clip
//! factor (two roundings, n·2^-32 units in all); trainers sum at most
//! [`CHUNK_ROWS`] = 2^6 rows in plain f64 (each chunk's error at most
//! 2^6·u·2^6·C, so n·2^6·u·C = n·2^-27 over the n/2^6 chunks: these add up,
//! which the first version of this bound missed, found by review); they
//! fold the chunks into a [`CompensatedSum`] (about 2u of Σ|chunk sums| ≤
//! n·C: n·2^-32); and the division by γ rounds once more (u of at most n·C:
//! n·2^-33). For n ≤ [`MAX_DP_ROWS`] = 2^25 (the data set's size, refused
//! at the first step above it; not the sample's), that is under 0.28 units,
//! within the 1/2 (and |sum/γ| ≤ 2^45 is an exact integer in f64). The
//! clip factor comes from a norm computed in floating point (relative error
//! at most d·u), so a clipped row can exceed `clip_norm` by up to d·2^-33
//! units in L2, far inside the rest of the slack (about 0.4√d units: the
//! two sums' errors take at most 0.56 of the second √d). So the
//! noise-free integer vectors of neighbouring
//! data sets differ by at most C/γ in L2, and the step is the discrete
//! Gaussian mechanism with noise multiplier σ_int / 2^bits on a Poisson
//! subsample: [`crate::rdp::DpEvent::PoissonSampledDiscreteGaussian`].
//! Everything after the noise (the division, the optimiser) is
//! post-processing.

use rand::{CryptoRng, RngCore};
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use crate::Error;
use crate::rdp::DpEvent;
use crate::sampler::{DiscreteGaussian, os_seeded_rng};

/// The L2 sensitivity of a step's sum in lattice units, 2^bits: 2^20 for
/// noise multipliers up to 64, fewer bits above so that σ_int = ⌈z·2^bits⌉
/// stays within the sampler's integer σ ≤ 2^26 (2^16 at z = 1024).
pub fn lattice_sensitivity(noise_multiplier: f64) -> f64 {
    let need = noise_multiplier.max(1.0).log2().ceil() as u32;
    f64::from(1u32 << 26u32.saturating_sub(need).min(20))
}

/// The largest noise multiplier (the lattice keeps at least 2^16 units of
/// sensitivity).
pub const MAX_NOISE_MULTIPLIER: f64 = 1024.0;

/// Rows a trainer sums in plain f64 before folding the partial sum into a
/// [`CompensatedSum`] (the error bound above: the chunks' errors add up, so
/// a chunk is kept small; 2^12 before 2026-12-07).
pub const CHUNK_ROWS: usize = 1 << 6;

/// The most rows a DP-SGD trainer samples from (so the most a sample can
/// hold): the floating-point error bound of the module docs holds up to
/// here. A data set this large is refused by the step, whatever was sampled.
pub const MAX_DP_ROWS: usize = 1 << 25;

/// Neumaier's compensated summation of vectors: the error of the total is
/// about 2·2^-53·Σ|parts|, whatever the number of parts.
#[derive(Debug, Clone)]
pub struct CompensatedSum {
    sum: Vec<f64>,
    compensation: Vec<f64>,
}

impl CompensatedSum {
    /// A zero sum of `len`-value vectors.
    pub fn new(len: usize) -> Self {
        CompensatedSum { sum: vec![0.0; len], compensation: vec![0.0; len] }
    }

    /// Adds `part` (of the same length; extra values are ignored).
    pub fn add(&mut self, part: &[f64]) {
        for ((s, c), &x) in self.sum.iter_mut().zip(&mut self.compensation).zip(part) {
            let t = *s + x;
            *c += if s.abs() >= x.abs() { (*s - t) + x } else { (x - t) + *s };
            *s = t;
        }
    }

    /// The total.
    pub fn finish(self) -> Vec<f64> {
        self.sum.into_iter().zip(self.compensation).map(|(s, c)| s + c).collect()
    }
}

/// DP-SGD's settings for one party's training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    /// C: each row's gradient is clipped to (slightly less than) this L2 norm.
    pub max_grad_norm: f64,
    /// z = σ / C, before rounding σ up onto the lattice.
    pub noise_multiplier: f64,
    /// q: each row is in a step's sample with this probability.
    pub sampling_rate: f64,
    /// The public divisor of a step's noisy sum (the expected sample size).
    pub expected_batch_size: f64,
    /// d: the number of trainable values.
    pub dim: usize,
}

/// DP-SGD for one party's training: its sampler, clipping and noise.
pub struct DpSgd {
    cfg: DpSgdConfig,
    gamma: f64,
    clip_norm: f64,
    sigma_int: u32,
    noise: DiscreteGaussian,
    rng: ChaCha20Rng,
    /// The next steps' noise vectors, drawn by a thread of their own
    /// ([`DpSgd::with_reserve`]); `None`: noise is drawn inline.
    reserve: Option<NoiseReserve>,
    /// Steps whose noise was drawn inline, none being ready.
    drawn_inline: u64,
    /// floor(q·2^64): a row is sampled when a uniform u64 is below it.
    sample_threshold: u64,
    sample_all: bool,
}

impl std::fmt::Debug for DpSgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpSgd").field("cfg", &self.cfg).field("sigma_int", &self.sigma_int).finish_non_exhaustive()
    }
}

impl DpSgd {
    /// Checks `cfg` and seeds the party's generator from the operating system.
    pub fn new(cfg: DpSgdConfig) -> Result<Self, Error> {
        let c = cfg.max_grad_norm;
        // (Central DP runs adaptive clipping's rounds through here, at
        // clips down to the adaptive range's floor.)
        if !(c.is_finite() && c >= crate::MIN_ROUND_CLIP) {
            return Err(Error::InvalidInput(format!(
                "max_grad_norm must be finite and at least {:e} (got {c})",
                crate::MIN_ROUND_CLIP
            )));
        }
        let z = cfg.noise_multiplier;
        if !(z.is_finite() && z > 0.0 && z <= MAX_NOISE_MULTIPLIER) {
            return Err(Error::InvalidInput(format!(
                "noise_multiplier must be in (0, {MAX_NOISE_MULTIPLIER}] (got {z})"
            )));
        }
        let q = cfg.sampling_rate;
        if !(q.is_finite() && q > 0.0 && q <= 1.0) {
            return Err(Error::InvalidInput(format!("sampling_rate must be in (0, 1] (got {q})")));
        }
        let b = cfg.expected_batch_size;
        if !(b.is_finite() && b >= 1.0) {
            return Err(Error::InvalidInput(format!("expected batch size must be at least 1 (got {b})")));
        }
        // 2√d must stay well below the lattice units of sensitivity.
        let lattice = lattice_sensitivity(z);
        let root_d = (cfg.dim as f64).sqrt();
        if cfg.dim == 0 || 2.0 * root_d > lattice / 2.0 {
            return Err(Error::InvalidInput(format!(
                "{} trainable values: DP-SGD at noise multiplier {z} takes 1 to {}",
                cfg.dim,
                (lattice / 4.0).powi(2)
            )));
        }
        let gamma = c / lattice;
        let sigma = (z * lattice).ceil();
        let sigma_int = sigma as u32;
        let sample_all = q >= 1.0;
        // floor(q·2^64) without overflow: q < 1 here, so q·2^64 < 2^64.
        let sample_threshold = if sample_all { u64::MAX } else { (q * 18_446_744_073_709_551_616.0) as u64 };
        let noise = DiscreteGaussian::with_sigma(sigma_int)?;
        Ok(DpSgd {
            cfg,
            gamma,
            clip_norm: c - 2.0 * gamma * root_d,
            sigma_int,
            noise,
            rng: os_seeded_rng()?,
            reserve: None,
            drawn_inline: 0,
            sample_threshold,
            sample_all,
        })
    }

    /// Takes each step's noise from `reserve` where it was drawn for this
    /// mechanism and round (the same σ, length and capacity for `ahead`
    /// steps), else from a new reserve holding up to `ahead` vectors; a
    /// step that finds none ready draws its own.
    /// A trainer gives the reserve back ([`DpSgd::into_reserve`]) after its
    /// round and passes it in again next round, so the next round's noise is
    /// drawn while the party waits between rounds (the noise does not
    /// depend on the data). Worth it for many steps; a single release
    /// (central DP) would only draw vectors nobody uses.
    pub fn with_reserve(mut self, reserve: Option<NoiseReserve>, ahead: usize) -> Self {
        self.reserve = match reserve {
            Some(r)
                if r.sigma_int == self.sigma_int
                    && r.dim == self.cfg.dim
                    && r.capacity == reserve_capacity(self.cfg.dim, ahead) =>
            {
                Some(r)
            }
            // Noise for another mechanism is of no use: dropped, it is wiped.
            _ => NoiseReserve::start(self.noise, self.sigma_int, self.cfg.dim, ahead),
        };
        self
    }

    /// The reserve of noise drawn ahead, for the next round's mechanism.
    pub fn into_reserve(mut self) -> Option<NoiseReserve> {
        self.reserve.take()
    }

    /// Steps so far whose noise was drawn inline (on the trainer's thread),
    /// none being ready in the reserve.
    pub fn noise_drawn_inline(&self) -> u64 {
        self.drawn_inline
    }

    /// The settings.
    pub fn config(&self) -> &DpSgdConfig {
        &self.cfg
    }

    /// The L2 norm each row's gradient is clipped to: C − 2γ√d (the slack
    /// covers rounding onto the lattice).
    pub fn clip_norm(&self) -> f64 {
        self.clip_norm
    }

    /// The factor that clips a gradient of L2 norm `norm`: 1 when it is
    /// within [`DpSgd::clip_norm`], else `clip_norm / norm`; 0 for a NaN or
    /// infinite norm (that row then adds nothing).
    pub fn clip_factor(&self, norm: f64) -> f64 {
        if !norm.is_finite() {
            0.0
        } else if norm > self.clip_norm {
            self.clip_norm / norm
        } else {
            1.0
        }
    }

    /// The noise multiplier actually applied: σ_int / 2^bits ≥ z.
    pub fn effective_noise_multiplier(&self) -> f64 {
        f64::from(self.sigma_int) / lattice_sensitivity(self.cfg.noise_multiplier)
    }

    /// What one step costs: the Poisson-subsampled discrete Gaussian.
    pub fn event(&self) -> DpEvent {
        step_event(self.cfg.sampling_rate, self.cfg.noise_multiplier)
    }

    /// The indices of a Poisson sample of `rows` rows (each independently
    /// with probability q', the largest multiple of 2^-64 not above q; a
    /// smaller rate only amplifies privacy more).
    ///
    /// More than [`MAX_DP_ROWS`] rows are refused: the error bound of the
    /// summation (module docs) holds up to there.
    pub fn poisson_sample(&mut self, rows: usize) -> Result<Vec<usize>, Error> {
        if rows > MAX_DP_ROWS {
            return Err(Error::InvalidInput(format!(
                "DP-SGD over {rows} rows: the summation's error bound holds for at most 2^25 rows"
            )));
        }
        if self.sample_all {
            return Ok((0..rows).collect());
        }
        Ok((0..rows).filter(|_| self.rng.next_u64() < self.sample_threshold).collect())
    }

    /// Turns the step's clipped sum (length d, each row's gradient scaled
    /// by its [`DpSgd::clip_factor`]) into the noisy mean gradient, in place:
    /// γ·(round(sum/γ) + N_Z(0, σ_int²)) / expected batch size.
    pub fn privatize(&mut self, clipped_sum: &mut [f64]) -> Result<(), Error> {
        if clipped_sum.len() != self.cfg.dim {
            return Err(Error::InvalidInput(format!(
                "a gradient of {} values; DP-SGD was set up for {}",
                clipped_sum.len(),
                self.cfg.dim
            )));
        }
        if clipped_sum.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput("the clipped gradient sum has NaN or infinite values".into()));
        }
        // A vector the noise thread has ready, or else one drawn here (from
        // this mechanism's own OS-seeded stream) rather than waiting: when
        // drawing a vector takes longer than a step (small models), both
        // threads draw and a step takes about the mean of the two instead
        // of the noise thread's time. Every vector is used once, whichever
        // thread drew it.
        let noise = match self.reserve.as_ref().and_then(NoiseReserve::take) {
            Some(noise) => noise,
            None => {
                self.drawn_inline += 1;
                let mut noise = Zeroizing::new(vec![0i64; clipped_sum.len()]);
                self.noise.fill_from(&mut noise, &mut self.rng);
                noise
            }
        };
        let out_scale = self.gamma / self.cfg.expected_batch_size;
        for (s, n) in clipped_sum.iter_mut().zip(noise.iter()) {
            // |sum/γ| ≤ rows·2^20: exact integers in f64 below 2^53.
            let lattice = (*s / self.gamma).round();
            *s = (lattice + *n as f64) * out_scale;
        }
        Ok(())
    }
}

/// The bytes of DP-SGD noise a trainer's reserve queues (64 MiB: a
/// round's steps for small models, 8 steps of a million values); always
/// room for two vectors, and one more is held while it is being drawn.
pub const MAX_RESERVE_BYTES: usize = 64 << 20;

/// The vectors a reserve queues for `ahead` steps of `dim` values: at most
/// [`MAX_RESERVE_BYTES`] of them, at least 2.
fn reserve_capacity(dim: usize, ahead: usize) -> usize {
    ahead.min(MAX_RESERVE_BYTES / (8 * dim.max(1))).max(2)
}

/// DP-SGD noise vectors drawn ahead by a thread of their own, from its own
/// OS-seeded ChaCha20 stream, and kept across rounds. The thread runs at
/// the lowest scheduling priority (Linux: nice 19, that thread only), so it
/// takes a spare core during training and otherwise the time the party
/// spends waiting between rounds, not the trainer's. It ends when the
/// reserve is dropped; the vectors are wiped when dropped (those still
/// queued too).
pub struct NoiseReserve {
    rx: std::sync::mpsc::Receiver<Zeroizing<Vec<i64>>>,
    sigma_int: u32,
    dim: usize,
    capacity: usize,
    /// Vectors the thread has queued, and those taken from the queue.
    queued: std::sync::Arc<std::sync::atomic::AtomicU64>,
    taken: std::cell::Cell<u64>,
}

impl std::fmt::Debug for NoiseReserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseReserve")
            .field("sigma_int", &self.sigma_int)
            .field("dim", &self.dim)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl NoiseReserve {
    /// Starts the thread, queueing up to [`reserve_capacity`] vectors;
    /// `None` if it cannot start (the steps then draw inline).
    fn start(noise: DiscreteGaussian, sigma_int: u32, dim: usize, ahead: usize) -> Option<NoiseReserve> {
        use std::sync::atomic::Ordering;
        let capacity = reserve_capacity(dim, ahead);
        let mut rng = os_seeded_rng().ok()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Zeroizing<Vec<i64>>>(capacity);
        let queued = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = queued.clone();
        std::thread::Builder::new()
            .name("dp-sgd-noise".into())
            .spawn(move || {
                // Linux applies a PRIO_PROCESS priority of "this process"
                // to the calling thread alone; elsewhere it would lower the
                // whole party, so it is left at the default there.
                #[cfg(target_os = "linux")]
                let _ = rustix::process::setpriority_process(None, 19);
                loop {
                    let mut v = Zeroizing::new(vec![0i64; dim]);
                    noise.fill_from(&mut v, &mut rng);
                    if tx.send(v).is_err() {
                        return;
                    }
                    counter.fetch_add(1, Ordering::Release);
                }
            })
            .ok()?;
        Some(NoiseReserve { rx, sigma_int, dim, capacity, queued, taken: std::cell::Cell::new(0) })
    }

    fn take(&self) -> Option<Zeroizing<Vec<i64>>> {
        let v = self.rx.try_recv().ok()?;
        self.taken.set(self.taken.get() + 1);
        Some(v)
    }

    /// Vectors ready to be taken (one more may be in the queue, counted as
    /// soon as its sender returns).
    pub fn ready(&self) -> usize {
        let queued = self.queued.load(std::sync::atomic::Ordering::Acquire);
        usize::try_from(queued.saturating_sub(self.taken.get())).unwrap_or(usize::MAX)
    }

    /// Vectors taken from it since it started, over every round it served.
    pub fn taken(&self) -> u64 {
        self.taken.get()
    }

    /// The most vectors it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Waits until the reserve is full or `within` has passed (benchmarks
    /// and tests: the time a party waits between rounds); whether it is.
    pub fn wait_full(&self, within: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + within;
        while self.ready() < self.capacity {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }
}

/// One DP-SGD step's privacy event: the discrete Gaussian with multiplier
/// ⌈z·2^bits⌉/2^bits on a Poisson subsample at rate `q`.
pub fn step_event(q: f64, z: f64) -> DpEvent {
    let lattice = lattice_sensitivity(z);
    let sigma_int = (z * lattice).ceil();
    DpEvent::PoissonSampledDiscreteGaussian { sampling_rate: q, noise_multiplier: sigma_int / lattice }
}

/// Draws a Poisson sample from any CSPRNG (for tests with fixed seeds).
pub fn poisson_sample_from<R: CryptoRng + ?Sized>(rng: &mut R, rows: usize, q: f64) -> Vec<usize> {
    let threshold = (q.clamp(0.0, 1.0) * 18_446_744_073_709_551_616.0).min(u64::MAX as f64) as u64;
    (0..rows).filter(|_| q >= 1.0 || rng.next_u64() < threshold).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(dim: usize) -> DpSgdConfig {
        DpSgdConfig { max_grad_norm: 1.0, noise_multiplier: 1.0, sampling_rate: 0.1, expected_batch_size: 10.0, dim }
    }

    #[test]
    fn refuses_bad_settings_naming_them() {
        for (bad, field) in [
            (DpSgdConfig { max_grad_norm: 0.0, ..cfg(4) }, "max_grad_norm"),
            (DpSgdConfig { max_grad_norm: crate::MIN_ROUND_CLIP / 2.0, ..cfg(4) }, "max_grad_norm"),
            (DpSgdConfig { max_grad_norm: 5e-324, ..cfg(4) }, "max_grad_norm"),
            (DpSgdConfig { noise_multiplier: 1025.0, ..cfg(4) }, "noise_multiplier"),
            (DpSgdConfig { sampling_rate: 0.0, ..cfg(4) }, "sampling_rate"),
            (DpSgdConfig { expected_batch_size: 0.5, ..cfg(4) }, "batch size"),
            (cfg(0), "trainable values"),
        ] {
            let e = DpSgd::new(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        // The floor of an adaptive round's clip is a clip.
        assert!(DpSgd::new(DpSgdConfig { max_grad_norm: crate::MIN_ROUND_CLIP, ..cfg(4) }).is_ok());
    }

    #[test]
    fn clipping_leaves_room_for_rounding_and_the_noise_is_rounded_up() {
        let dp = DpSgd::new(cfg(10_000)).unwrap();
        // C − 2γ√d with γ = 2^-20.
        assert!((dp.clip_norm() - (1.0 - 200.0 / f64::from(1 << 20))).abs() < 1e-15);
        assert_eq!(lattice_sensitivity(64.0), f64::from(1 << 20));
        assert_eq!(lattice_sensitivity(65.0), f64::from(1 << 19));
        assert_eq!(lattice_sensitivity(1024.0), f64::from(1 << 16));
        let big = DpSgd::new(DpSgdConfig { noise_multiplier: 300.0, ..cfg(4) }).unwrap();
        assert!(big.sigma_int <= 1 << 26 && big.effective_noise_multiplier() >= 300.0);
        assert_eq!(dp.clip_factor(0.5), 1.0);
        assert!((dp.clip_factor(4.0) * 4.0 - dp.clip_norm()).abs() < 1e-15);
        assert_eq!(dp.clip_factor(f64::NAN), 0.0);
        assert!(dp.effective_noise_multiplier() >= 1.0);
        let odd = DpSgd::new(DpSgdConfig { noise_multiplier: 1.1, ..cfg(4) }).unwrap();
        assert!(odd.effective_noise_multiplier() >= 1.1 && odd.effective_noise_multiplier() < 1.1 + 1e-6);
    }

    /// The sensitivity argument: two sums that differ by one clipped
    /// gradient round to lattice vectors at most 2^20 apart. Random sums
    /// and gradients at the clipping norm, then the worst case built on
    /// purpose: a gradient along (1, …, 1) whose coordinates each sit just
    /// above a whole number of lattice units, added to a sum whose
    /// coordinates sit just below a rounding boundary, so that every
    /// coordinate rounds up by almost a whole extra unit and the extra √d
    /// adds to the gradient's norm in the same direction. That case comes
    /// within 0.1% of C_clip/γ + √d (it is the worst) and still fits, with
    /// √d left for the floating-point summation's error.
    #[test]
    fn neighbouring_sums_round_within_the_lattice_sensitivity() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let rounded_distance = |dp: &DpSgd, base: &[f64], with: &[f64]| {
            let d2: f64 =
                base.iter().zip(with).map(|(a, b)| ((b / dp.gamma).round() - (a / dp.gamma).round()).powi(2)).sum();
            d2.sqrt()
        };
        for dim in [1usize, 7, 1000] {
            let dp = DpSgd::new(cfg(dim)).unwrap();
            for _ in 0..200 {
                let base: Vec<f64> = (0..dim).map(|_| (rng.next_u32() as f64 / 2e9 - 1.0) * 30.0).collect();
                let g: Vec<f64> = (0..dim).map(|_| rng.next_u32() as f64 / 4e9 - 0.5).collect();
                let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                let f = dp.clip_norm() / norm;
                let with: Vec<f64> = base.iter().zip(&g).map(|(b, x)| b + f * x).collect();
                let d = rounded_distance(&dp, &base, &with);
                assert!(d <= lattice_sensitivity(1.0), "dim {dim}: {d}");
            }
            // The worst case: each coordinate of the gradient is n + 0.001
            // units (n whole, the norm at most the clip), each of the sum
            // 0.0005 units below a rounding boundary.
            let root_d = (dim as f64).sqrt();
            let per = dp.clip_norm() / dp.gamma / root_d;
            let units = if per.fract() >= 0.001 { per.floor() + 0.001 } else { per.floor() - 0.999 };
            let base: Vec<f64> = (0..dim).map(|i| ((i as f64 * 37.0 - 5000.0).round() + 0.4995) * dp.gamma).collect();
            let with: Vec<f64> = base.iter().map(|b| b + units * dp.gamma).collect();
            let gradient_norm = units * dp.gamma * root_d;
            assert!(gradient_norm <= dp.clip_norm(), "dim {dim}: the gradient is clipped");
            let d = rounded_distance(&dp, &base, &with);
            let worst = dp.clip_norm() / dp.gamma + root_d;
            assert!(d >= worst * 0.999 - 1.0, "dim {dim}: {d} is not the worst case {worst}");
            assert!(d <= lattice_sensitivity(1.0) - root_d * 0.99, "dim {dim}: {d} leaves no room for summation error");
        }
    }

    /// The noise in a privatized zero vector is γ/B times N_Z(0, σ_int²):
    /// its sample variance matches σ_int² (fixed OS seeds differ per run, so
    /// the bound is 6 standard errors: a false alarm below 10^-8).
    #[test]
    fn privatized_noise_has_the_calibrated_variance() {
        let dim = 200_000;
        let mut dp = DpSgd::new(DpSgdConfig { noise_multiplier: 0.5, ..cfg(dim) }).unwrap().with_reserve(None, 2);
        let mut v = vec![0.0; dim];
        dp.privatize(&mut v).unwrap();
        let unit = dp.gamma / dp.cfg.expected_batch_size;
        let sigma = f64::from(dp.sigma_int);
        let var = v.iter().map(|x| (x / unit).powi(2)).sum::<f64>() / dim as f64;
        let se = sigma * sigma * (2.0 / dim as f64).sqrt();
        assert!((var - sigma * sigma).abs() < 6.0 * se, "{var} vs {}", sigma * sigma);
        assert!(v.iter().all(|x| ((x / unit) - (x / unit).round()).abs() < 1e-6), "every output is on the lattice");
        assert!(dp.privatize(&mut [0.0; 3]).is_err());
        assert!(dp.privatize(&mut vec![f64::NAN; dim]).is_err());
    }

    /// Steps faster than the noise thread draw their own vectors instead of
    /// waiting: every step still gets fresh noise (no vector twice, from
    /// whichever thread), at the calibrated variance.
    #[test]
    fn steps_that_outrun_the_noise_thread_draw_fresh_noise() {
        let dim = 2000;
        let mut dp = DpSgd::new(DpSgdConfig { noise_multiplier: 0.5, ..cfg(dim) }).unwrap().with_reserve(None, 2);
        steps_take_fresh_calibrated_noise(&mut dp, dim, 200);
        // The path this test is for ran (200 steps of microseconds against
        // a thread drawing 2,000 values a vector with room for two).
        assert!(dp.noise_drawn_inline() > 0, "no step outran the noise thread");
    }

    /// Privatizes `steps` zero vectors: no noise vector serves twice, and
    /// the noise's sample variance is σ_int² within 6 standard errors.
    fn steps_take_fresh_calibrated_noise(dp: &mut DpSgd, dim: usize, steps: usize) {
        let unit = dp.gamma / dp.cfg.expected_batch_size;
        let mut seen = std::collections::HashSet::new();
        let mut sum_sq = 0.0;
        for _ in 0..steps {
            let mut v = vec![0.0; dim];
            dp.privatize(&mut v).unwrap();
            sum_sq += v.iter().map(|x| (x / unit).powi(2)).sum::<f64>();
            let key: Vec<i64> = v.iter().map(|x| (x / unit).round() as i64).collect();
            assert!(seen.insert(key), "a noise vector was used twice");
        }
        let sigma = f64::from(dp.sigma_int);
        let var = sum_sq / (steps * dim) as f64;
        let se = sigma * sigma * (2.0 / (steps * dim) as f64).sqrt();
        assert!((var - sigma * sigma).abs() < 6.0 * se, "{var} vs {}", sigma * sigma);
    }

    /// A reserve given back after a round and passed to the next round's
    /// mechanism holds the noise drawn in between: those steps draw nothing
    /// inline, each vector serves one step, and a mechanism with another σ
    /// or length does not take it (its noise would be miscalibrated).
    #[test]
    fn a_reserve_kept_across_rounds_serves_the_next_rounds_steps() {
        use std::time::Duration;
        let (dim, steps) = (500, 40);
        let round = |reserve| {
            DpSgd::new(DpSgdConfig { noise_multiplier: 0.5, ..cfg(dim) }).unwrap().with_reserve(reserve, steps)
        };
        let first = round(None);
        let reserve = first.into_reserve().expect("a reserve");
        assert_eq!(reserve.capacity(), steps);
        // The party waits between rounds: the reserve fills meanwhile.
        assert!(reserve.wait_full(Duration::from_secs(60)), "filled: {}", reserve.ready());
        let mut dp = round(Some(reserve));
        steps_take_fresh_calibrated_noise(&mut dp, dim, steps);
        assert_eq!(dp.noise_drawn_inline(), 0, "every step's noise was drawn ahead");
        // Another noise multiplier, or another length: a new reserve.
        let reserve = dp.into_reserve().expect("a reserve");
        assert!(reserve.wait_full(Duration::from_secs(60)));
        let other =
            DpSgd::new(DpSgdConfig { noise_multiplier: 2.0, ..cfg(dim) }).unwrap().with_reserve(Some(reserve), steps);
        let reserve = other.into_reserve().expect("a reserve");
        assert_eq!(reserve.sigma_int, DpSgd::new(DpSgdConfig { noise_multiplier: 2.0, ..cfg(dim) }).unwrap().sigma_int);
        let longer = DpSgd::new(DpSgdConfig { noise_multiplier: 2.0, ..cfg(dim + 1) })
            .unwrap()
            .with_reserve(Some(reserve), steps);
        assert_eq!(longer.into_reserve().expect("a reserve").dim, dim + 1);
        // A round of another length: a reserve of its own length.
        let reserve = round(None).into_reserve().expect("a reserve");
        let shorter =
            DpSgd::new(DpSgdConfig { noise_multiplier: 0.5, ..cfg(dim) }).unwrap().with_reserve(Some(reserve), 10);
        assert_eq!(shorter.into_reserve().map(|r| r.capacity()), Some(10));
        // At most MAX_RESERVE_BYTES queued, and never fewer than two.
        assert_eq!(reserve_capacity(1 << 20, 1000), MAX_RESERVE_BYTES / (8 << 20));
        assert_eq!(reserve_capacity(dim, steps), steps);
        assert_eq!(reserve_capacity(4, 0), 2);
        assert_eq!(reserve_capacity(100 << 20, 1000), 2);
    }

    #[test]
    fn compensated_sums_keep_what_plain_sums_lose() {
        let mut c = CompensatedSum::new(1);
        let mut plain = 0.0;
        for x in [1e16, 1.0, -1e16, 1.0] {
            c.add(&[x]);
            plain += x;
        }
        assert_eq!(c.finish(), vec![2.0]);
        assert_ne!(plain, 2.0);
    }

    #[test]
    fn poisson_samples_have_the_sampling_rate() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let n = 100_000;
        let s = poisson_sample_from(&mut rng, n, 0.05);
        // Binomial(100000, 0.05): sd ≈ 69; 6 sd.
        assert!((s.len() as f64 - 5000.0).abs() < 420.0, "{}", s.len());
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(poisson_sample_from(&mut rng, 10, 1.0).len(), 10);
        let mut dp = DpSgd::new(cfg(3)).unwrap();
        let t = dp.poisson_sample(n).unwrap();
        assert!((t.len() as f64 - 10_000.0).abs() < 600.0, "{}", t.len());
        // Beyond the rows the error bound covers: refused, before a draw.
        let e = dp.poisson_sample(MAX_DP_ROWS + 1).unwrap_err().to_string();
        assert!(e.contains("at most 2^25 rows"), "{e}");
        // The bound itself, per coordinate in lattice units: the clip
        // factor's rounding, the chunks' plain sums (which add up), the
        // compensated sum and the division, within half a unit.
        let (n, u, c, chunk) = (MAX_DP_ROWS as f64, 2f64.powi(-53), 2f64.powi(20), CHUNK_ROWS as f64);
        // (A weight is a product scaled: two roundings a row.)
        let error = n * 2.0 * u * c + n * chunk * u * c + n * 2.0 * u * c + n * u * c;
        assert!(error < 0.28, "{error}");
        assert!(n * c <= 2f64.powi(53));
        // Poisson, not a fixed-size batch (shuffled or strided): over 4000
        // steps of 200 rows at q = 0.1 the sample's size varies as
        // Binomial(200, 0.1) (variance 18; a fixed size has 0), and every
        // row is drawn about 400 times (sd 19).
        let (rows, steps) = (200, 4000);
        let mut drawn = vec![0u32; rows];
        let sizes: Vec<f64> = (0..steps)
            .map(|_| {
                let s = dp.poisson_sample(rows).unwrap();
                s.iter().for_each(|&i| drawn[i] += 1);
                s.len() as f64
            })
            .collect();
        let mean = sizes.iter().sum::<f64>() / steps as f64;
        let var = sizes.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (steps - 1) as f64;
        // The sample variance's sd is about 0.4 here: 14..22 is ±10 sd.
        assert!((mean - 20.0).abs() < 0.6 && (14.0..22.0).contains(&var), "mean {mean}, variance {var}");
        assert!(drawn.iter().all(|&c| (286..=514).contains(&c)), "{drawn:?}");
    }
}
