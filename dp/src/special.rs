//! Special functions the accountant needs, as scipy computes them.

/// ln|Γ(x)| (scipy's `gammaln`).
pub(crate) fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// ln(erfc(x)), accurate where erfc underflows (x > ~26): there the
/// asymptotic series dp_accounting falls back on when scipy lacks
/// `log_ndtr`, with relative error below 10^−10.
pub(crate) fn ln_erfc(x: f64) -> f64 {
    let r = libm::erfc(x);
    if r > 1e-300 {
        return r.ln();
    }
    let x2 = x * x;
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x2 - 0.5 / x2 + 0.625 / (x2 * x2) - 37.0 / 24.0 / (x2 * x2 * x2)
        + 353.0 / 64.0 / (x2 * x2 * x2 * x2)
}

/// ln(e^a + e^b), exact at −∞.
pub(crate) fn ln_add(a: f64, b: f64) -> f64 {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    (lo - hi).exp().ln_1p() + hi
}

/// Φ(x) for the standard normal.
pub(crate) fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// ln Φ(x), accurate far into the lower tail.
pub(crate) fn normal_ln_cdf(x: f64) -> f64 {
    ln_erfc(-x / std::f64::consts::SQRT_2) - std::f64::consts::LN_2
}

/// The standard normal quantile of `p`, by bisection on ln Φ (so it works
/// at p = e^−50, where Newton on Φ would be fussy).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    let target = p.ln();
    let (mut lo, mut hi) = (-60.0f64, 60.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if normal_ln_cdf(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_erfc_is_continuous_across_the_underflow() {
        // Where erfc still works, the series agrees with it.
        for x in [10.0, 20.0, 26.0] {
            let direct = libm::erfc(x).ln();
            let x2: f64 = x * x;
            let series = -std::f64::consts::PI.ln() / 2.0 - f64::ln(x) - x2 - 0.5 / x2 + 0.625 / (x2 * x2)
                - 37.0 / 24.0 / (x2 * x2 * x2)
                + 353.0 / 64.0 / (x2 * x2 * x2 * x2);
            assert!((direct - series).abs() < 1e-9 * direct.abs(), "{x}: {direct} vs {series}");
        }
        // Past erfc's underflow, ln_erfc itself against mpmath
        // (`mp.log(mp.erfc(x))` at 50 digits), to 2e-12: the series' last
        // term is 2e-11 at x = 27.
        for (x, reference) in
            [(27.0, -732.868_886_507_897_4), (30.0, -903.974_117_110_643_9), (40.0, -1_604.261_556_653_273_6)]
        {
            let ours = ln_erfc(x);
            assert!((ours - reference).abs() < 2e-12, "{x}: {ours} vs {reference}");
        }
        assert!((ln_erfc(-40.0) - 2f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn ln_gamma_known_values() {
        assert!((ln_gamma(5.0) - 24f64.ln()).abs() < 1e-13);
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        // Negative non-integers: ln|Γ|, as scipy's gammaln. Γ(−0.5) = −2√π.
        assert!((ln_gamma(-0.5) - (2.0 * std::f64::consts::PI.sqrt()).ln()).abs() < 1e-13);
    }

    #[test]
    fn normal_quantile_inverts_the_cdf() {
        assert!(normal_quantile(0.5).abs() < 1e-12);
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-9);
        // Deep in the tail, where the PLD truncates the noise (scipy: norm.ppf(0.5 * exp(-50))).
        assert!((normal_quantile(0.5 * (-50f64).exp()) + 9.745_474_864_965_935).abs() < 1e-9);
    }
}
