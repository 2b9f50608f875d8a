//! A Rényi-DP accountant (Mironov, CSF 2017) for the Gaussian mechanism,
//! with or without Poisson subsampling.
//!
//! The subsampled Gaussian's RDP is computed as in Mironov, Talwar and
//! Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
//! (2019): a finite binomial sum at integer orders, the two-sided series of
//! their Section 3.3 at fractional ones. RDP is converted to (ε, δ) with the
//! bound of Canonne, Kamath and Steinke (2020, Prop. 12) / Asoodeh et al.
//! (2020), minimised over the orders. The orders, formulas and conversion
//! are those of Google's `dp_accounting` 0.6.0, and the tests check this
//! code against values it produced (`scripts/dp_reference.py`).
//!
//! Neighbouring data sets differ by adding or removing one record (or one
//! party, for party-level DP).

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::special::{ln_add, ln_erfc, ln_gamma};

/// `dp_accounting`'s default orders: 1.1, 1.2, …, 10.9, 11, …, 63, 128, 256,
/// 512, 1024. Fractional orders matter for small ε.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

/// Integer orders 2, 3, …, 128 and 256: the orders of the distributed-DP
/// authors' accountant, for mechanisms bounded only at integer orders
/// ([`DpEvent::PoissonSampledDiscreteGaussian`]).
pub fn integer_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (2..=128).map(f64::from).collect();
    orders.push(256.0);
    orders
}

/// A mechanism the accountant composes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum DpEvent {
    /// The Gaussian mechanism: noise standard deviation
    /// `noise_multiplier` × the L2 sensitivity.
    Gaussian {
        /// σ / Δ₂.
        noise_multiplier: f64,
    },
    /// The Gaussian mechanism on a Poisson subsample: each record is in it
    /// independently with probability `sampling_rate` (DP-SGD's step).
    PoissonSampledGaussian {
        /// q, in [0, 1].
        sampling_rate: f64,
        /// σ / Δ₂.
        noise_multiplier: f64,
    },
    /// One round of the distributed discrete Gaussian ([`crate::ddg`]):
    /// Kairouz–Liu–Steinke's Proposition 14 for the sum of the honest
    /// parties' discrete Gaussians. Never the continuous formulas: a sum of
    /// discrete Gaussians is not a discrete Gaussian.
    DistributedDiscreteGaussian {
        /// Δ₁ / (√n·σ), lattice units (n honest parties, each σ).
        l1_scale: f64,
        /// Δ₂ / (√n·σ).
        l2_scale: f64,
        /// τ of the paper's Theorem 1.
        tau: f64,
        /// The rotated dimension d'.
        dim: u64,
    },
    /// The discrete Gaussian mechanism on a Poisson subsample (DP-SGD with
    /// exact noise on a lattice): each record is in the step's sample with
    /// probability `sampling_rate`, and the sum of the sample's integer
    /// vectors (each of L2 norm at most Δ₂) gets N_Z(0, σ²) noise per
    /// coordinate with σ = `noise_multiplier` × Δ₂.
    ///
    /// Accounted as Kairouz, Liu and Steinke (ICML 2021) do: the general
    /// subsampling bound of Zhu and Wang (ICML 2019, Theorem 5), which holds
    /// for any mechanism with a given RDP curve, applied to the discrete
    /// Gaussian's curve α·Δ²/2σ² (Canonne, Kamath, Steinke 2020), at integer
    /// orders only (∞ at fractional ones), and never worse than the
    /// unsampled curve. The tighter Mironov–Talwar–Zhang figure is proven
    /// only for continuous noise; see `docs/differential-privacy.md`.
    PoissonSampledDiscreteGaussian {
        /// q, in [0, 1].
        sampling_rate: f64,
        /// σ / Δ₂.
        noise_multiplier: f64,
    },
}

impl DpEvent {
    fn check(&self) -> Result<(), Error> {
        let noise = |z: f64| {
            if z.is_finite() && z >= 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidInput(format!("noise_multiplier must be finite and non-negative (got {z})")))
            }
        };
        match *self {
            DpEvent::Gaussian { noise_multiplier } => noise(noise_multiplier),
            DpEvent::PoissonSampledGaussian { sampling_rate, noise_multiplier }
            | DpEvent::PoissonSampledDiscreteGaussian { sampling_rate, noise_multiplier } => {
                if !(0.0..=1.0).contains(&sampling_rate) {
                    return Err(Error::InvalidInput(format!("sampling_rate must be in [0, 1] (got {sampling_rate})")));
                }
                noise(noise_multiplier)
            }
            DpEvent::DistributedDiscreteGaussian { l1_scale, l2_scale, tau, dim } => {
                let fine = |x: f64| x.is_finite() && x >= 0.0;
                if fine(l1_scale) && fine(l2_scale) && fine(tau) && dim > 0 {
                    Ok(())
                } else {
                    Err(Error::InvalidInput(format!(
                        "distributed discrete Gaussian: l1_scale {l1_scale}, l2_scale {l2_scale} and tau {tau} \
                         must be finite and non-negative, dim {dim} positive"
                    )))
                }
            }
        }
    }

    /// The same release for neighbours twice as far apart (e.g. one record
    /// changed inside a party whose whole clipped update is the unit).
    pub fn at_double_sensitivity(self) -> DpEvent {
        match self {
            DpEvent::Gaussian { noise_multiplier } => DpEvent::Gaussian { noise_multiplier: noise_multiplier / 2.0 },
            DpEvent::PoissonSampledGaussian { sampling_rate, noise_multiplier } => {
                DpEvent::PoissonSampledGaussian { sampling_rate, noise_multiplier: noise_multiplier / 2.0 }
            }
            DpEvent::PoissonSampledDiscreteGaussian { sampling_rate, noise_multiplier } => {
                DpEvent::PoissonSampledDiscreteGaussian { sampling_rate, noise_multiplier: noise_multiplier / 2.0 }
            }
            DpEvent::DistributedDiscreteGaussian { l1_scale, l2_scale, tau, dim } => {
                DpEvent::DistributedDiscreteGaussian { l1_scale: 2.0 * l1_scale, l2_scale: 2.0 * l2_scale, tau, dim }
            }
        }
    }

    /// The event's RDP at order `alpha` > 1 (∞ without noise).
    pub fn rdp(&self, alpha: f64) -> f64 {
        match *self {
            DpEvent::Gaussian { noise_multiplier } => subsampled_gaussian_rdp(1.0, noise_multiplier, alpha),
            DpEvent::PoissonSampledGaussian { sampling_rate, noise_multiplier } => {
                subsampled_gaussian_rdp(sampling_rate, noise_multiplier, alpha)
            }
            DpEvent::DistributedDiscreteGaussian { l1_scale, l2_scale, tau, dim } => {
                crate::ddg::ddg_rdp(alpha, l1_scale, l2_scale, tau, dim)
            }
            DpEvent::PoissonSampledDiscreteGaussian { sampling_rate, noise_multiplier } => {
                subsampled_discrete_gaussian_rdp(sampling_rate, noise_multiplier, alpha)
            }
        }
    }
}

/// RDP at order `alpha` of the discrete Gaussian with noise multiplier `z`
/// on a Poisson subsample at rate `q`: Zhu–Wang's general upper bound
/// (Theorem 5; as `_compute_rdp_subsampled(upper_bound=True)` in the
/// distributed-DP authors' code) of the curve ε(l) = l/2z², capped by the
/// unsampled curve. Only integer orders ≥ 2 are bounded; others are ∞.
pub fn subsampled_discrete_gaussian_rdp(q: f64, z: f64, alpha: f64) -> f64 {
    let unsampled = |l: f64| if z == 0.0 { f64::INFINITY } else { l / (2.0 * z * z) };
    if q == 0.0 {
        return 0.0;
    }
    if alpha < 2.0 || alpha.fract() != 0.0 || !alpha.is_finite() {
        return f64::INFINITY;
    }
    if q >= 1.0 || z == 0.0 {
        return unsampled(alpha);
    }
    let a = alpha as u64;
    let (ln_q, ln_1q) = (q.ln(), (-q).ln_1p());
    let ln_comb = |n: u64, k: u64| ln_gamma(n as f64 + 1.0) - ln_gamma(k as f64 + 1.0) - ln_gamma((n - k) as f64 + 1.0);
    // log Σ of: (1−q)^{α−1}(αq − q + 1), C(α,2) q² (1−q)^{α−2} e^{ε(2)},
    // and 3·C(α,l) q^l (1−q)^{α−l} e^{(l−1)ε(l)} for l = 3..α.
    let mut total = (alpha - 1.0) * ln_1q + (alpha * q - q + 1.0).ln();
    total = ln_add(total, ln_comb(a, 2) + 2.0 * ln_q + (alpha - 2.0) * ln_1q + unsampled(2.0));
    for l in 3..=a {
        let lf = l as f64;
        let term = 3f64.ln() + ln_comb(a, l) + lf * ln_q + (alpha - lf) * ln_1q + (lf - 1.0) * unsampled(lf);
        total = ln_add(total, term);
    }
    (total / (alpha - 1.0)).min(unsampled(alpha))
}

/// RDP at order `alpha` of the Gaussian mechanism with noise multiplier `z`
/// on a Poisson subsample at rate `q`.
pub fn subsampled_gaussian_rdp(q: f64, z: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if alpha.is_infinite() || z == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * z * z);
    }
    let ln_a = if alpha.fract() == 0.0 { ln_a_int(q, z, alpha) } else { ln_a_frac(q, z, alpha) };
    ln_a / (alpha - 1.0)
}

/// ln A_α at integer α: ln Σ_{i=0}^{α} C(α,i) q^i (1−q)^{α−i} e^{(i²−i)/2z²}.
fn ln_a_int(q: f64, z: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let two_z2 = 2.0 * z * z;
    let mut ln_a = f64::NEG_INFINITY;
    // ln C(α, i), updated term by term: C(α, i+1) = C(α, i)·(α−i)/(i+1).
    let mut ln_comb = 0.0;
    let n = alpha as u64;
    for i in 0..=n {
        let fi = i as f64;
        let s = ln_comb + fi * ln_q + (alpha - fi) * ln_1mq + (fi * fi - fi) / two_z2;
        ln_a = ln_add(ln_a, s);
        ln_comb += (alpha - fi).ln() - (fi + 1.0).ln();
    }
    ln_a
}

/// ln A_α at fractional α: the two series of Mironov–Talwar–Zhang §3.3,
/// summed until both terms decrease and fall 30 nats below the total
/// (`dp_accounting`'s rule). ∞ if they have not after 1,000 terms.
fn ln_a_frac(q: f64, z: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let (mut ln_a0, mut ln_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let two_z2 = 2.0 * z * z;
    let sqrt2z = std::f64::consts::SQRT_2 * z;
    let ln_half = 0.5f64.ln();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    // ln|C(α, i)| (generalised binomial), term by term as in ln_a_int.
    let mut ln_comb = 0.0;
    let ln_gamma_alpha = ln_gamma(alpha + 1.0);
    for i in 0..1000u32 {
        let fi = f64::from(i);
        if i % 64 == 0 {
            // Re-anchored on lgamma now and then so rounding cannot drift.
            ln_comb = ln_gamma_alpha - ln_gamma(fi + 1.0) - ln_gamma(alpha - fi + 1.0);
        }
        let j = alpha - fi;
        let ln_t0 = ln_comb + fi * ln_q + j * ln_1mq;
        let ln_t1 = ln_comb + j * ln_q + fi * ln_1mq;
        let ln_e0 = ln_half + ln_erfc((fi - z0) / sqrt2z);
        let ln_e1 = ln_half + ln_erfc((z0 - j) / sqrt2z);
        let s0 = ln_t0 + (fi * fi - fi) / two_z2 + ln_e0;
        let s1 = ln_t1 + (j * j - j) / two_z2 + ln_e1;
        ln_a0 = ln_add(ln_a0, s0);
        ln_a1 = ln_add(ln_a1, s1);
        let total = ln_add(ln_a0, ln_a1);
        if s0 < last_s0 && s1 < last_s1 && s0.max(s1) < total - 30.0 {
            return total;
        }
        (last_s0, last_s1) = (s0, s1);
        ln_comb += (alpha - fi).abs().ln() - (fi + 1.0).ln();
    }
    f64::INFINITY
}

/// The smallest ε over `orders` such that RDP `rdp` implies (ε, δ)-DP, and
/// the order reaching it (CKS20 Prop. 12, with the KL bound for ε = 0).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), Error> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(Error::InvalidInput(format!("delta must be in (0, 1) (got {delta})")));
    }
    if orders.len() != rdp.len() || orders.is_empty() {
        return Err(Error::InvalidInput(format!("{} orders for {} RDP values", orders.len(), rdp.len())));
    }
    let mut best = (f64::INFINITY, orders[0]);
    for (&a, &r) in orders.iter().zip(rdp) {
        if a.is_nan() || a < 1.0 {
            return Err(Error::InvalidInput(format!("RDP order {a}: must be at least 1")));
        }
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            // Negative RDP only comes from rounding: no leakage at this order.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// The RDP of everything composed so far, order by order. Serializable, so
/// that a checkpoint carries it and a resumed job reports the same ε.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    /// ∞ at orders where the mechanism has no finite RDP (no noise, or a
    /// series that did not converge): written as "inf", which JSON can hold.
    #[serde(with = "finite_or_inf")]
    rdp: Vec<f64>,
}

/// Serde for RDP values: numbers, and the string "inf" for +∞ (JSON has no
/// infinity, and serde_json would write `null` and then refuse to read it).
mod finite_or_inf {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let out: Vec<Value> = values
            .iter()
            .map(|&v| if v == f64::INFINITY { Value::Text("inf".into()) } else { Value::Number(v) })
            .collect();
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Vec::<Value>::deserialize(d)?
            .into_iter()
            .map(|v| match v {
                Value::Number(x) if x.is_finite() && x >= 0.0 => Ok(x),
                Value::Text(t) if t == "inf" => Ok(f64::INFINITY),
                _ => Err(serde::de::Error::custom("an RDP value must be a non-negative number or \"inf\"")),
            })
            .collect()
    }
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant over [`default_orders`], with nothing spent.
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        RdpAccountant { orders, rdp }
    }

    /// An accountant restored from its [`RdpAccountant::orders`] and
    /// [`RdpAccountant::rdp`] (as a checkpoint keeps them).
    pub fn from_parts(orders: Vec<f64>, rdp: Vec<f64>) -> Result<Self, Error> {
        let mut acc = Self::with_orders(orders)?;
        if rdp.len() != acc.orders.len() || rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
            return Err(Error::InvalidInput(format!(
                "{} RDP values for {} orders, each non-negative",
                rdp.len(),
                acc.orders.len()
            )));
        }
        acc.rdp = rdp;
        Ok(acc)
    }

    /// An accountant over `orders` (each > 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, Error> {
        if orders.is_empty() || orders.iter().any(|&a| a.is_nan() || a <= 1.0) {
            return Err(Error::InvalidInput("RDP orders must be non-empty and each above 1".into()));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(RdpAccountant { orders, rdp })
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Composes `event` `count` times: RDP adds up order by order.
    pub fn compose(&mut self, event: &DpEvent, count: u64) -> Result<(), Error> {
        event.check()?;
        if count == 0 {
            // Nothing spent (and 0·∞ would be NaN).
            return Ok(());
        }
        if self.orders.len() != self.rdp.len() {
            return Err(Error::InvalidInput(format!(
                "accountant state has {} orders and {} RDP values",
                self.orders.len(),
                self.rdp.len()
            )));
        }
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += count as f64 * event.rdp(a);
        }
        Ok(())
    }

    /// Composes, `count` times, a mechanism known only to be one of
    /// `events` (e.g. the distributed discrete Gaussian at whichever model
    /// size the job turns out to have): at each order the worst of their
    /// RDP bounds, which bounds the mechanism's whatever it is.
    pub fn compose_worst(&mut self, events: &[DpEvent], count: u64) -> Result<(), Error> {
        if events.is_empty() {
            return Err(Error::InvalidInput("no events to take the worst of".into()));
        }
        for e in events {
            e.check()?;
        }
        if count == 0 {
            return Ok(());
        }
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            // (A NaN bound counts as ∞: `f64::max` would skip it.)
            let worst = events
                .iter()
                .map(|e| e.rdp(a))
                .map(|r| if r.is_nan() { f64::INFINITY } else { r })
                .fold(0.0f64, f64::max);
            *r += count as f64 * worst;
        }
        Ok(())
    }

    /// Adds another accountant's spending (same orders).
    pub fn absorb(&mut self, other: &RdpAccountant) -> Result<(), Error> {
        if other.orders != self.orders {
            return Err(Error::InvalidInput("accountants over different RDP orders".into()));
        }
        for (r, o) in self.rdp.iter_mut().zip(&other.rdp) {
            *r += o;
        }
        Ok(())
    }

    /// Raises each order's RDP to at least `other`'s (same orders): an
    /// accountant that bounds both.
    pub fn raise_to(&mut self, other: &RdpAccountant) -> Result<(), Error> {
        if other.orders != self.orders {
            return Err(Error::InvalidInput("accountants over different RDP orders".into()));
        }
        for (r, o) in self.rdp.iter_mut().zip(&other.rdp) {
            *r = r.max(*o);
        }
        Ok(())
    }

    /// (ε, the optimal order) at `delta`.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), Error> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// The orders an accountant for `event` should track: [`integer_orders`]
/// for the subsampled discrete Gaussian (bounded only there), the default
/// grid otherwise.
pub fn orders_for(event: &DpEvent) -> Vec<f64> {
    match event {
        DpEvent::PoissonSampledDiscreteGaussian { .. } => integer_orders(),
        _ => default_orders(),
    }
}

/// ε after `steps` compositions of `event` at `delta`, over
/// [`orders_for`] the event (so calibration and accounting agree).
pub fn epsilon(event: &DpEvent, steps: u64, delta: f64) -> Result<f64, Error> {
    let mut acc = RdpAccountant::with_orders(orders_for(event))?;
    acc.compose(event, steps)?;
    Ok(acc.epsilon(delta)?.0)
}

/// The smallest noise multiplier z (to a relative 10^−4) with which `steps`
/// compositions of `event(z)` stay within (`target_epsilon`, `delta`).
pub fn calibrate_noise_multiplier(
    target_epsilon: f64,
    delta: f64,
    steps: u64,
    event: impl Fn(f64) -> DpEvent,
) -> Result<f64, Error> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(Error::InvalidInput(format!("target epsilon must be positive and finite (got {target_epsilon})")));
    }
    if steps == 0 {
        return Err(Error::InvalidInput("steps must be at least 1 (no steps need no noise)".into()));
    }
    calibrate_by(target_epsilon, &format!("at δ = {delta} over {steps} steps"), |z| epsilon(&event(z), steps, delta))
}

/// The smallest noise multiplier z (to 10^-4 relative) with `eps(z)` ≤
/// `target_epsilon`, for any ε that decreases in z; `what` says where the
/// target applies, for the error when no z up to 10^6 reaches it.
pub fn calibrate_by(target_epsilon: f64, what: &str, eps: impl Fn(f64) -> Result<f64, Error>) -> Result<f64, Error> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(Error::InvalidInput(format!("target epsilon must be positive and finite (got {target_epsilon})")));
    }
    let mut hi = 1.0;
    // (Fails closed: a NaN ε does not meet the target.)
    let meets = |e: f64| e <= target_epsilon;
    while !meets(eps(hi)?) {
        hi *= 2.0;
        if hi > 1e6 {
            return Err(Error::Unreachable(format!(
                "no noise multiplier up to 10^6 reaches ε = {target_epsilon} {what}"
            )));
        }
    }
    let mut lo = hi / 2.0;
    if eps(lo)? <= target_epsilon {
        lo = 0.0;
    }
    // ε(z) decreases in z: bisect [lo, hi] with ε(hi) ≤ target < ε(lo).
    while hi - lo > 1e-4 * hi {
        let mid = 0.5 * (lo + hi);
        if eps(mid)? <= target_epsilon {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Party-level records are charged at twice the sensitivity (one record
    /// moves a party's whole clipped update): the Gaussian's RDP becomes
    /// four times larger, the sampled mechanisms keep their rate at half the
    /// noise multiplier, and the distributed mechanism's L1 and L2 scales
    /// double while τ (the divergence from a true discrete Gaussian, which
    /// does not depend on the neighbours) stays.
    #[test]
    fn double_sensitivity_is_half_the_noise_multiplier_or_twice_the_scales() {
        let g = DpEvent::Gaussian { noise_multiplier: 3.0 };
        for a in [2.0, 8.0, 32.0] {
            let (x, y) = (g.at_double_sensitivity().rdp(a), 4.0 * g.rdp(a));
            assert!((x - y).abs() <= 1e-12 * y, "order {a}: {x} vs {y}");
        }
        for e in [
            DpEvent::PoissonSampledGaussian { sampling_rate: 0.01, noise_multiplier: 1.2 },
            DpEvent::PoissonSampledDiscreteGaussian { sampling_rate: 0.01, noise_multiplier: 1.2 },
        ] {
            let doubled = e.at_double_sensitivity();
            let expected = match e {
                DpEvent::PoissonSampledGaussian { sampling_rate, .. } => {
                    DpEvent::PoissonSampledGaussian { sampling_rate, noise_multiplier: 0.6 }
                }
                DpEvent::PoissonSampledDiscreteGaussian { sampling_rate, .. } => {
                    DpEvent::PoissonSampledDiscreteGaussian { sampling_rate, noise_multiplier: 0.6 }
                }
                _ => unreachable!(),
            };
            assert_eq!(doubled, expected);
            assert!(doubled.rdp(8.0) > e.rdp(8.0));
        }
        let d = DpEvent::DistributedDiscreteGaussian { l1_scale: 0.3, l2_scale: 0.01, tau: 1e-6, dim: 1024 };
        assert_eq!(
            d.at_double_sensitivity(),
            DpEvent::DistributedDiscreteGaussian { l1_scale: 0.6, l2_scale: 0.02, tau: 1e-6, dim: 1024 }
        );
        assert!(d.at_double_sensitivity().rdp(8.0) > d.rdp(8.0));
    }

    #[test]
    fn unsampled_gaussian_rdp_is_alpha_over_two_z_squared() {
        let e = DpEvent::Gaussian { noise_multiplier: 2.0 };
        for a in [1.5, 2.0, 10.0, 64.0] {
            assert!((e.rdp(a) - a / 8.0).abs() < 1e-15);
        }
    }

    #[test]
    fn integer_and_fractional_orders_agree_where_they_meet() {
        // The two formulas are the same function of α: just either side of an
        // integer order they must nearly agree.
        for (q, z) in [(0.01, 1.0), (0.1, 0.8), (0.5, 2.0)] {
            for a in [2.0, 5.0, 20.0] {
                let at = subsampled_gaussian_rdp(q, z, a);
                let near = subsampled_gaussian_rdp(q, z, a + 1e-7);
                assert!((at - near).abs() <= 1e-5 * at.abs().max(1e-12), "q={q} z={z} α={a}: {at} vs {near}");
            }
        }
    }

    #[test]
    fn more_noise_or_less_sampling_never_costs_more() {
        let mut last = f64::INFINITY;
        for z in [0.5, 0.7, 1.0, 1.5, 3.0] {
            let e = epsilon(&DpEvent::PoissonSampledGaussian { sampling_rate: 0.01, noise_multiplier: z }, 1000, 1e-5)
                .expect("eps");
            assert!(e < last, "z = {z}: {e} ≥ {last}");
            last = e;
        }
        let mut last = 0.0;
        for q in [0.001, 0.01, 0.1, 1.0] {
            let e = epsilon(&DpEvent::PoissonSampledGaussian { sampling_rate: q, noise_multiplier: 1.0 }, 100, 1e-5)
                .expect("eps");
            assert!(e > last, "q = {q}: {e} ≤ {last}");
            last = e;
        }
    }

    /// A calibration whose ε is NaN at every multiplier finds none: a NaN
    /// does not meet the target (it would pass a `>` test).
    #[test]
    fn a_nan_epsilon_never_meets_a_target() {
        assert!(matches!(calibrate_by(1.0, "", |_| Ok(f64::NAN)), Err(Error::Unreachable(_))));
        // NaN at small multipliers only: the search goes past them.
        let z = calibrate_by(1.0, "", |z| Ok(if z < 4.0 { f64::NAN } else { 8.0 / z })).expect("reachable");
        assert!((8.0..8.01).contains(&z), "{z}");
    }

    /// `raise_to` keeps each order's larger value, so the curve bounds
    /// both accountants' (the larger one's ε, at least), and refuses other
    /// orders.
    #[test]
    fn raising_an_accountant_keeps_the_larger_curve_order_by_order() {
        let (mut low, mut high) = (RdpAccountant::new(), RdpAccountant::new());
        low.compose(&DpEvent::Gaussian { noise_multiplier: 3.0 }, 2).expect("compose");
        high.compose(&DpEvent::Gaussian { noise_multiplier: 3.0 }, 5).expect("compose");
        let mut raised = low.clone();
        raised.raise_to(&high).expect("same orders");
        assert_eq!(raised, high);
        let mut kept = high.clone();
        kept.raise_to(&low).expect("same orders");
        assert_eq!(kept, high, "a lower curve changes nothing");
        // Curves that cross: the pointwise maximum, above each.
        let mut steep = RdpAccountant::new();
        steep.compose(&DpEvent::PoissonSampledGaussian { sampling_rate: 0.5, noise_multiplier: 0.8 }, 1).expect("c");
        let mut both = steep.clone();
        both.raise_to(&low).expect("same orders");
        for ((b, s), l) in both.rdp().iter().zip(steep.rdp()).zip(low.rdp()) {
            assert_eq!(*b, s.max(*l));
        }
        assert!(both.epsilon(1e-5).expect("eps").0 >= steep.epsilon(1e-5).expect("eps").0);
        assert!(both.epsilon(1e-5).expect("eps").0 >= low.epsilon(1e-5).expect("eps").0);
        let other = RdpAccountant::with_orders(vec![2.0, 4.0]).expect("orders");
        assert!(raised.raise_to(&other).is_err());
    }

    #[test]
    fn accountant_state_round_trips_and_absorbs() {
        let mut a = RdpAccountant::new();
        a.compose(&DpEvent::Gaussian { noise_multiplier: 3.0 }, 5).expect("compose");
        let json = serde_json::to_string(&a).expect("json");
        let back: RdpAccountant = serde_json::from_str(&json).expect("parse");
        assert_eq!(a, back);
        let mut b = RdpAccountant::new();
        b.absorb(&a).expect("absorb");
        b.absorb(&a).expect("absorb");
        let mut c = RdpAccountant::new();
        c.compose(&DpEvent::Gaussian { noise_multiplier: 3.0 }, 10).expect("compose");
        for (x, y) in b.rdp().iter().zip(c.rdp()) {
            assert!((x - y).abs() <= 1e-12 * y);
        }
        // Orders with infinite RDP (q = 0.2, z = 0.5: the series at α < 2
        // does not converge) survive a checkpoint too.
        let mut d = RdpAccountant::new();
        d.compose(&DpEvent::PoissonSampledGaussian { sampling_rate: 0.2, noise_multiplier: 0.5 }, 3).expect("compose");
        assert!(d.rdp().iter().any(|r| r.is_infinite()));
        let back: RdpAccountant = serde_json::from_str(&serde_json::to_string(&d).expect("json")).expect("parse");
        assert_eq!(d, back);
        assert_eq!(d.epsilon(1e-5).expect("eps"), back.epsilon(1e-5).expect("eps"));
        assert!(serde_json::from_str::<RdpAccountant>(r#"{"orders":[2.0],"rdp":[-1.0]}"#).is_err());
        // Zero compositions spend nothing, even at infinite orders.
        let before = d.clone();
        d.compose(&DpEvent::Gaussian { noise_multiplier: 0.0 }, 0).expect("compose");
        assert_eq!(d, before);
    }

    #[test]
    fn bad_parameters_are_named() {
        let mut a = RdpAccountant::new();
        let err = a.compose(&DpEvent::PoissonSampledGaussian { sampling_rate: 1.5, noise_multiplier: 1.0 }, 1);
        assert!(err.expect_err("q").to_string().contains("sampling_rate"));
        let err = a.compose(&DpEvent::Gaussian { noise_multiplier: f64::NAN }, 1);
        assert!(err.expect_err("z").to_string().contains("noise_multiplier"));
        let ddg = DpEvent::DistributedDiscreteGaussian { l1_scale: 1.0, l2_scale: f64::NAN, tau: 0.0, dim: 8 };
        assert!(a.compose(&ddg, 1).expect_err("nan").to_string().contains("l2_scale NaN"));
        assert!(a.epsilon(0.0).expect_err("delta").to_string().contains("delta"));
        assert!(RdpAccountant::with_orders(vec![1.0]).is_err());
        assert!(calibrate_noise_multiplier(0.0, 1e-5, 10, |z| DpEvent::Gaussian { noise_multiplier: z }).is_err());
        assert!(calibrate_noise_multiplier(1.0, 1e-5, 0, |z| DpEvent::Gaussian { noise_multiplier: z }).is_err());
    }

    #[test]
    fn no_noise_is_infinite_epsilon_and_no_sampling_is_free() {
        let inf = epsilon(&DpEvent::Gaussian { noise_multiplier: 0.0 }, 1, 1e-5).expect("eps");
        assert!(inf.is_infinite());
        let zero = epsilon(&DpEvent::PoissonSampledGaussian { sampling_rate: 0.0, noise_multiplier: 1.0 }, 1000, 1e-5)
            .expect("eps");
        assert_eq!(zero, 0.0);
    }
}
