//! The round's degree k and threshold t, chosen from a stated threat model:
//! the fraction γ of parties that may be corrupt (colluding with the
//! coordinator) and the fraction δ that may drop out, with statistical
//! security σ = 40 (privacy fails with probability ≤ 2^-σ) and correctness
//! η = 30 (an honest round fails with probability ≤ 2^-η).
//!
//! * **Complete graph** (up to [`COMPLETE_UP_TO`] parties, or when a sparse
//!   graph would need nearly every party anyway): every party is every
//!   other's neighbour, c = max(⌊γn⌋, ⌊γN⌋) parties may be corrupt (N the
//!   job's named parties: the coordinator picks each round, so it can put
//!   every colluder of the federation in a small one; [`choose_in`]), and
//!   t = ⌊(n + c)/2⌋ + 1, so that two survivor sets can never both gather t
//!   signatures (2t − n > c, Bonawitz et al. 2017): the coordinator learns at
//!   most one sum. Correctness needs n − 1 − ⌊δn⌋ ≥ t.
//! * **Sparse graph** (SecAgg+, Bell et al. 2020): a random Harary graph of
//!   degree k. With c the number of corrupt neighbours a party has except
//!   with probability 2^-σ/n (a hypergeometric quantile), t is chosen so
//!   that 2t − k > c: two survivor sets cannot both gather t signatures from
//!   one party's neighbours, so no party's two secrets are ever revealed.
//!   t must stay below the number of surviving neighbours a party keeps
//!   except with probability 2^-η/n, and the graph must stay connected once
//!   the corrupt and dropped parties are removed except with probability
//!   2^-σ. This is the search of Google's SecAgg implementation
//!   (`fcp/secagg/server/graph_parameter_finder.cc`, its "semi-malicious
//!   server" class), whose published test vectors the tests below check.

use crate::Error;

/// Parties up to which the complete graph is used (it is cheaper than a
/// sparse one of nearly the same degree, and its guarantee is stronger).
pub const COMPLETE_UP_TO: usize = 20;

/// Statistical security: privacy fails with probability at most 2^-SIGMA.
pub const SIGMA: u32 = 40;

/// Correctness: an honest round fails with probability at most 2^-ETA.
pub const ETA: u32 = 30;

/// The threat model a job states.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThreatModel {
    /// γ: fraction of the parties that may be corrupt: of a round's, and
    /// (what every round of a job counts too, [`choose_in`]) of the job's.
    pub corrupt_fraction: f64,
    /// δ: fraction of the round's parties that may drop out.
    pub dropout_fraction: f64,
}

/// What [`choose`] picked, and why it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundParams {
    /// Neighbours per party (n − 1: the complete graph).
    pub degree: usize,
    /// Shares needed to rebuild a secret.
    pub threshold: usize,
    /// Whether every party is every other's neighbour.
    pub complete: bool,
    /// Corrupt neighbours a party may have without losing privacy (2t − k > this).
    pub corrupt_neighbours: usize,
    /// log2 of the probability that some party has more corrupt neighbours
    /// than that, under the threat model (−∞: impossible).
    pub privacy_failure_log2: f64,
    /// log2 of the probability that an honest round fails with at most δn
    /// dropouts (−∞: impossible).
    pub correctness_failure_log2: f64,
}

impl std::fmt::Display for RoundParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (k, t, c) = (self.degree, self.threshold, self.corrupt_neighbours);
        if self.complete {
            write!(
                f,
                "complete graph (k = {k}), threshold t = {t}: private against up to {c} corrupt parties \
                 (2t − n > {c}: at most one sum can be revealed); completes with up to {} dropouts",
                k - t
            )
        } else {
            let p = |l: f64| if l == f64::NEG_INFINITY { "0".to_owned() } else { format!("2^{l:.1}") };
            write!(
                f,
                "sparse graph, degree k = {k}, threshold t = {t}: private while no party has more than {c} corrupt \
                 neighbours (2t − k > {c}; fails with probability {} under the threat model); an honest round \
                 fails with probability {}",
                p(self.privacy_failure_log2),
                p(self.correctness_failure_log2)
            )
        }
    }
}

/// Checks the threat model's fractions.
pub fn check(tm: &ThreatModel) -> Result<(), String> {
    let (g, d) = (tm.corrupt_fraction, tm.dropout_fraction);
    if !(0.0..1.0 / 3.0).contains(&g) {
        return Err(format!("corrupt_fraction must be in [0, 1/3) (got {g})"));
    }
    if !(0.0..0.5).contains(&d) {
        return Err(format!("dropout_fraction must be in [0, 0.5) (got {d})"));
    }
    if g + 2.0 * d > 0.9 {
        return Err(format!("corrupt_fraction + 2 × dropout_fraction must be at most 0.9 (got {})", g + 2.0 * d));
    }
    Ok(())
}

/// The degree and threshold for `n` parties under `tm`, or why none exists.
pub fn choose(n: usize, tm: &ThreatModel) -> Result<RoundParams, Error> {
    choose_in(n, tm, 0)
}

/// [`choose`] for a round of `n` parties drawn from a federation in which
/// `federation_corrupt` parties may collude (⌊γN⌋ of its N named parties):
/// the coordinator chooses each round's parties, so it can place every
/// colluder in a small round. The round then assumes
/// max(⌊γn⌋, `federation_corrupt`) of its n parties corrupt.
pub fn choose_in(n: usize, tm: &ThreatModel, federation_corrupt: usize) -> Result<RoundParams, Error> {
    check(tm).map_err(Error::InvalidInput)?;
    if n < 3 {
        return Err(Error::InvalidInput(format!("secure aggregation needs at least 3 parties (got {n})")));
    }
    let corrupt = corrupt_parties(n, tm).max(federation_corrupt);
    if n > COMPLETE_UP_TO
        && let Some(p) = sparse(n, tm, corrupt, SIGMA, ETA)
    {
        return Ok(p);
    }
    complete(n, tm, corrupt)
}

/// A tiny slack so that fractions like 0.05 × 100 floor to 5, not 4.
const SMALL: f64 = 1e-14;

/// The most corrupt parties the threat model allows in a round of `n`:
/// ⌊γn⌋ (with a hair of slack so that 0.05 × 100 is 5).
pub fn corrupt_parties(n: usize, tm: &ThreatModel) -> usize {
    fraction_of(tm.corrupt_fraction, n)
}

/// ⌊fraction · n⌋, with a hair of slack against the product's rounding
/// (0.29 × 100 is 28.999999999999996 in f64): what a stated fraction of
/// `n` parties means, for every protocol that counts corrupt parties.
pub fn fraction_of(fraction: f64, n: usize) -> usize {
    ((fraction + SMALL) * n as f64).floor() as usize
}

fn complete(n: usize, tm: &ThreatModel, corrupt: usize) -> Result<RoundParams, Error> {
    let dropped = ((tm.dropout_fraction + SMALL) * n as f64).floor() as usize;
    let k = n - 1;
    let t = ((n + corrupt) / 2 + 1).max(2);
    if t > k || k - dropped.min(k) < t {
        return Err(Error::InvalidInput(format!(
            "{n} parties cannot tolerate {corrupt} corrupt and {dropped} dropped parties at once \
             (threshold {t} of {k} neighbours); lower corrupt_fraction or dropout_fraction"
        )));
    }
    Ok(RoundParams {
        degree: k,
        threshold: t,
        complete: true,
        corrupt_neighbours: corrupt,
        privacy_failure_log2: f64::NEG_INFINITY,
        correctness_failure_log2: f64::NEG_INFINITY,
    })
}

/// The smallest even degree k < n − 1 that meets the sparse conditions at
/// statistical security `sigma` and correctness `eta`.
fn sparse(n: usize, tm: &ThreatModel, corrupt: usize, sigma: u32, eta: u32) -> Option<RoundParams> {
    let nf = n as f64;
    let survivors = ((1.0 - tm.dropout_fraction - SMALL) * nf).ceil() as usize;
    let bad = corrupt + ((tm.dropout_fraction + SMALL) * nf).floor() as usize;
    let privacy_q = 2f64.powi(-(sigma as i32 + 1)) / nf;
    let correct_q = 2f64.powi(-(eta as i32)) / nf;
    let mut k = 2;
    while k < n - 1 {
        // The Harary graph minus the bad parties stays connected unless k of
        // them fall on consecutive positions: a union bound over the gaps.
        let disconnect_ln = if k > bad {
            f64::NEG_INFINITY
        } else {
            nf.ln() + ((n - k - 1) as f64).ln() - 2f64.ln() + ln_gamma((bad + 1) as f64) + ln_gamma((n - k + 1) as f64)
                - ln_gamma((n + 1) as f64)
                - ln_gamma((bad - k + 1) as f64)
        };
        if disconnect_ln >= -((sigma + 1) as f64) * 2f64.ln() {
            k += 2;
            continue;
        }
        let corrupt_nb = Hypergeometric { total: n, marked: corrupt, sampled: k };
        let live_nb = Hypergeometric { total: n, marked: survivors, sampled: k };
        let c = corrupt_nb.quantile(privacy_q, true);
        let mut live = live_nb.quantile(correct_q, false);
        if live_nb.cdf(live as f64) < correct_q {
            live += 1;
        }
        let t1 = ((c as f64 + k as f64 - 1.25) / 2.0).ceil() as i64;
        if live <= t1 {
            k += 2;
            continue;
        }
        let t = (t1 + 1).max(2) as usize;
        let c = c.max(0) as usize;
        let privacy = nf * (1.0 - corrupt_nb.cdf(c as f64));
        let correctness = nf * live_nb.cdf(t as f64 - 1.0) + disconnect_ln.exp();
        return Some(RoundParams {
            degree: k,
            threshold: t,
            complete: false,
            corrupt_neighbours: c,
            privacy_failure_log2: log2_or_floor(privacy),
            correctness_failure_log2: log2_or_floor(correctness),
        });
    }
    None
}

/// log2 of `p`; a probability below f64's resolution (computed as 0 or
/// less) is reported as −∞.
fn log2_or_floor(p: f64) -> f64 {
    if p > 0.0 { p.log2() } else { f64::NEG_INFINITY }
}

/// ln Γ(x) for x ≥ 1 (Lanczos, g = 7, 9 terms; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Drawing `sampled` of `total` items of which `marked` are marked, without
/// replacement: how many marked ones are drawn.
struct Hypergeometric {
    total: usize,
    marked: usize,
    sampled: usize,
}

impl Hypergeometric {
    /// P(X = x) when `c` items are marked.
    fn pmf_with(&self, x: i64, c: usize) -> f64 {
        let (n, s, c) = (self.total as i64, self.sampled as i64, c as i64);
        if x < 0 || x > s || x > c || n + x < c + s {
            return 0.0;
        }
        let lg = |v: i64| ln_gamma((v + 1) as f64);
        (lg(s) + lg(c) + lg(n - c) + lg(n - s) - lg(x) - lg(s - x) - lg(c - x) - lg(n) - lg(n - s - c + x)).exp()
    }

    /// P(X ≤ x) when `c` items are marked, summed downward from x.
    fn cdf_with(&self, x: i64, c: usize) -> f64 {
        let (n, s, cc) = (self.total as f64, self.sampled as f64, c as f64);
        let mut p = self.pmf_with(x, c);
        let mut sum = 0.0;
        let mut x = x as f64;
        while p > sum * 1e-16 {
            sum += p;
            p *= x;
            p *= n - cc - s + x;
            p /= cc - x + 1.0;
            p /= s - x + 1.0;
            x -= 1.0;
        }
        sum
    }

    /// P(X ≤ x).
    fn cdf(&self, x: f64) -> f64 {
        let x = x.floor() as i64;
        let mean = self.marked as f64 * self.sampled as f64 / self.total as f64;
        if x as f64 > mean {
            1.0 - self.cdf_with(self.sampled as i64 - x - 1, self.total - self.marked)
        } else {
            self.cdf_with(x, self.marked)
        }
    }

    /// The largest r with P(X ≤ r) < q (with `c` marked).
    fn quantile_with(&self, q: f64, c: usize) -> i64 {
        let (n, s) = (self.total as f64, self.sampled as f64);
        let lower = c as f64 + s - n - 1.0;
        let hoeffding = s * (c as f64 / n - (-q.ln() / (2.0 * s)).sqrt());
        let mut r = (-1f64).max(lower).max(hoeffding).floor() as i64;
        let mut cdf = self.cdf_with(r, c);
        let mut p = self.pmf_with(r, c);
        let cf = c as f64;
        while cdf < q && r < self.sampled as i64 {
            if p > 0.0 {
                let rf = r as f64;
                p /= rf + 1.0;
                p /= n - cf - s + rf + 1.0;
                p *= cf - rf;
                p *= s - rf;
            } else {
                p = self.pmf_with(r + 1, c);
            }
            cdf += p;
            r += 1;
        }
        r - 1
    }

    /// A bound exceeded with probability below `q`: from above
    /// (`upper`: marked items drawn exceed it with probability < q) or from
    /// below (fall under it with probability < q).
    fn quantile(&self, q: f64, upper: bool) -> i64 {
        let (mut q, mut upper) = (q, upper);
        if q > 0.5 {
            q = 1.0 - q;
            upper = !upper;
        }
        if upper {
            self.sampled as i64 - self.quantile_with(q, self.total - self.marked) - 1
        } else {
            self.quantile_with(q, self.marked)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tm(g: f64, d: f64) -> ThreatModel {
        ThreatModel { corrupt_fraction: g, dropout_fraction: d }
    }

    /// Google's published vectors for the semi-malicious server class at
    /// σ = 40, η = 20 (`graph_parameter_finder_test.cc`), reproduced with
    /// the search above at that η.
    #[test]
    fn the_search_reproduces_googles_vectors() {
        let eta20 = |n, g, d| {
            sparse(n, &tm(g, d), corrupt_parties(n, &tm(g, d)), 40, 20).map(|p| (p.degree, p.threshold)).unwrap()
        };
        assert_eq!(eta20(100, 0.05, 0.05), (16, 11));
        assert_eq!(eta20(1000, 0.05, 0.05), (52, 37));
        assert_eq!(eta20(10000, 0.05, 0.05), (62, 44));
        assert_eq!(eta20(1000, 0.33, 0.05).0, 132);
        assert_eq!(eta20(1000, 0.05, 0.33).0, 398);
    }

    #[test]
    fn sparse_parameters_at_eta_30() {
        let p = choose(1000, &tm(0.05, 0.05)).unwrap();
        assert_eq!((p.degree, p.threshold, p.complete), (62, 43, false));
        assert!(2 * p.threshold - p.degree > p.corrupt_neighbours, "{p}");
        assert!(p.privacy_failure_log2 <= -40.0, "{p}");
        assert!(p.correctness_failure_log2 <= -30.0, "{p}");
        let p = choose(100, &tm(0.05, 0.05)).unwrap();
        assert_eq!((p.degree, p.threshold), (16, 11));
    }

    #[test]
    fn small_federations_use_the_complete_graph_with_a_majority_threshold() {
        let p = choose(3, &tm(0.0, 0.0)).unwrap();
        assert_eq!((p.degree, p.threshold, p.complete), (2, 2, true));
        let p = choose(10, &tm(0.1, 0.1)).unwrap();
        // c = 1 corrupt: t = ⌊11/2⌋ + 1 = 6 > (n + c)/2; 9 − 1 dropped ≥ 6.
        assert_eq!((p.degree, p.threshold, p.corrupt_neighbours), (9, 6, 1));
        assert!(2 * p.threshold > 10 + p.corrupt_neighbours);
        let p = choose(20, &tm(0.2, 0.2)).unwrap();
        assert_eq!((p.degree, p.threshold), (19, 13));
        assert!(choose(3, &tm(0.0, 0.4)).is_err(), "3 parties cannot lose one with t = 2 of 2");
    }

    /// The figures `docs/secure-aggregation.md` gives for the default
    /// threat model (5 % corrupt, 10 % dropping out).
    #[test]
    fn the_documented_figures_at_the_defaults() {
        let d = tm(0.05, 0.1);
        let p = choose(5, &d).unwrap();
        assert_eq!((p.degree, p.threshold, p.complete), (4, 3, true));
        let p = choose(80, &d).unwrap();
        assert_eq!((p.degree, p.threshold, p.complete), (22, 14, false));
        let p = choose(1000, &d).unwrap();
        assert_eq!((p.degree, p.threshold), (90, 58));
        assert!((p.privacy_failure_log2 - -41.0).abs() < 0.5, "{p}");
        assert!((p.correctness_failure_log2 - -31.6).abs() < 0.05, "{p}");
    }

    #[test]
    fn impossible_threat_models_are_refused_by_field() {
        assert!(check(&tm(0.34, 0.0)).unwrap_err().contains("corrupt_fraction"));
        assert!(check(&tm(0.0, 0.5)).unwrap_err().contains("dropout_fraction"));
        assert!(check(&tm(0.3, 0.31)).unwrap_err().contains("0.9"));
        assert!(choose(2, &tm(0.0, 0.0)).is_err());
    }

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut f = 1.0f64;
        for n in 1..30u32 {
            f *= n as f64;
            assert!((ln_gamma(n as f64 + 1.0) - f.ln()).abs() < 1e-9, "{n}");
        }
    }
}
