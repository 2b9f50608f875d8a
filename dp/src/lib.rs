//! Differential privacy for Confide.
//!
//! Pure computation, like `crypto`: nothing here knows about networking or
//! libtorch. Its parts:
//!
//! * [`sampler`]: exact discrete Gaussian noise (Canonne, Kamath, Steinke
//!   2020) in integer arithmetic only, so no floating-point leakage
//!   (Mironov 2012), drawn from a ChaCha20 stream seeded by the operating
//!   system;
//! * [`rdp`]: a Rényi-DP accountant for the (Poisson-subsampled) Gaussian
//!   mechanism (Mironov, Talwar, Zhang 2019), with the (ε, δ) conversion of
//!   Canonne–Kamath–Steinke / Asoodeh et al., and calibration of a noise
//!   multiplier to a target ε. Its values are checked against Google's
//!   `dp_accounting` (`scripts/dp_reference.py`);
//! * [`pld`]: a privacy-loss-distribution accountant for the same
//!   mechanisms (connect-the-dots, FFT composition, as `dp_accounting`),
//!   tighter than RDP, with the lattice's discrete noise bridged to the
//!   continuous PLD by a total-variation bound charged against δ;
//! * [`ddg`]: the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021)
//!   that parties add before secure aggregation: rotation, conditional
//!   randomized rounding, integer noise and modular clipping, and its RDP
//!   bound;
//! * [`dpsgd`]: DP-SGD's Poisson sampling, clipping and exact lattice noise
//!   for a party's local training;
//! * [`evaluation`]: the noisy counts a party releases in a DP evaluation.

pub mod ddg;
pub mod dpsgd;
pub mod evaluation;
pub mod pld;
pub mod rdp;
pub mod sampler;
mod special;

mod error;
pub use error::Error;

/// The smallest clip (DP-SGD's gradient norm, party-level DP's update
/// norm) a job may state: below it the lattice's step (clip over the
/// lattice units of sensitivity) and the distributed mechanism's squared
/// terms approach f64's subnormal range, where their rounding is no
/// longer the tiny relative error the accounting allows for.
pub const MIN_CLIP: f64 = 1e-6;

/// The smallest clip a round may use: adaptive clipping moves the clip
/// down to [`MIN_CLIP`] over [`ddg::AdaptiveClip::RANGE`] (2^20), still far
/// from the subnormal range.
pub const MIN_ROUND_CLIP: f64 = MIN_CLIP / ddg::AdaptiveClip::RANGE;
