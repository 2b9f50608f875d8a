//! The coordinator side: the [`Strategy`] trait and [`FedAvg`].

use crate::{Error, FitConfig, Metrics, Parameters, State, TensorSpec};

/// One party's answer to a fit round.
#[derive(Debug, Clone)]
pub struct FitResult {
    /// The party's name.
    pub party: String,
    /// Training examples it used: the aggregation weight.
    pub num_examples: u64,
    /// Its locally trained parameters.
    pub params: Parameters,
    /// Its local metrics.
    pub metrics: Metrics,
}

/// One party's answer to an evaluation round.
#[derive(Debug, Clone)]
pub struct EvalResult {
    /// The party's name.
    pub party: String,
    /// Examples evaluated: the averaging weight.
    pub num_examples: u64,
    /// Mean loss.
    pub loss: f64,
    /// Further metrics.
    pub metrics: Metrics,
}

/// Checks one party's update against the global model's spec (names and
/// shapes), that it trained on some examples and that its metrics are
/// finite; the error names the party. The coordinator runs it on every
/// update, so a malformed one drops its party from the round. It does not
/// bound an update's values or its weight: the aggregation protocol caps
/// the claimed examples (`max_examples`), and the robust rules bound what
/// values can do.
pub fn check_update(expected: &[TensorSpec], result: &FitResult) -> Result<(), Error> {
    result
        .params
        .check_matches(expected)
        .map_err(|reason| Error::PeerMisbehaved { party: result.party.clone(), reason })?;
    if result.num_examples == 0 {
        return Err(Error::PeerMisbehaved { party: result.party.clone(), reason: "trained on zero examples".into() });
    }
    check_reported_metrics(&result.party, &result.metrics)
}

/// The largest magnitude a party may report for a metric (or loss): far
/// above any real one, and small enough that example-weighted sums of them
/// stay finite (an infinite mean would be stored as `null` and make the
/// job's records unreadable; found by review).
pub const MAX_REPORTED_METRIC: f64 = 1e12;

/// Metrics that are proportions: a party reporting one outside [0, 1]
/// misreports it (and under a weighted mean would move it past any honest
/// value).
pub const PROPORTION_METRICS: [&str; 5] = ["accuracy", "auc", "f1", "precision", "recall"];

/// Checks the metrics a party reported: finite, within
/// [`MAX_REPORTED_METRIC`], and proportions within [0, 1]; the error names
/// the party and the metric.
pub fn check_reported_metrics(party: &str, metrics: &Metrics) -> Result<(), Error> {
    for (k, &v) in metrics {
        let bad = !v.is_finite()
            || v.abs() > MAX_REPORTED_METRIC
            || (PROPORTION_METRICS.contains(&k.as_str()) && !(0.0..=1.0).contains(&v));
        if bad {
            return Err(Error::PeerMisbehaved { party: party.to_owned(), reason: format!("metric {k} is {v}") });
        }
    }
    Ok(())
}

/// What a strategy can aggregate. The coordinator checks it against what the
/// job's aggregation protocol reveals when the job is submitted, so a rule
/// that needs individual updates never meets a protocol that reveals only
/// their sum after round 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// It aggregates the parties' individual updates ([`Strategy::aggregate_fit`]).
    pub individual_updates: bool,
    /// It aggregates from the example-weighted sum alone
    /// ([`Strategy::aggregate_secure_sum`]), as secure aggregation and
    /// homomorphic encryption reveal.
    pub weighted_sum: bool,
}

impl Capabilities {
    /// Individual updates only (robust rules, and the default for custom strategies).
    pub const INDIVIDUAL_UPDATES: Capabilities = Capabilities { individual_updates: true, weighted_sum: false };
    /// Functions of the weighted mean: every protocol works.
    pub const ANY: Capabilities = Capabilities { individual_updates: true, weighted_sum: true };
}

/// What a strategy knows when it plans a round.
#[derive(Debug, Clone, Copy)]
pub struct RoundContext<'a> {
    /// The round, from 1.
    pub round: u32,
    /// Rounds the job runs.
    pub rounds: u32,
    /// Parties that can take part (accepted the job and connected), sorted.
    pub available: &'a [String],
    /// Fewest parties a stage needs; selecting fewer fails the round.
    pub min_parties: usize,
}

/// One party's part in a fit round.
#[derive(Debug, Clone, PartialEq)]
pub struct FitInstruction {
    /// The party.
    pub party: String,
    /// What it is told.
    pub config: FitConfig,
}

/// How the coordinator runs rounds: whom each fit round asks and what, and
/// how their answers become the next global model. Stages are methods, not
/// strings, so a new stage is a compile-time change.
pub trait Strategy: Send {
    /// Short name used in logs, errors and job status.
    fn name(&self) -> &str;

    /// What this strategy can aggregate; the default, individual updates
    /// only, is refused at submission for jobs whose protocol reveals only a
    /// sum. Override it when [`Strategy::aggregate_secure_sum`] is implemented.
    fn capabilities(&self) -> Capabilities {
        Capabilities::INDIVIDUAL_UPDATES
    }

    /// The fit round's participants and their configuration. `base` is the
    /// spec's `[training]` table for `ctx.round`. The default asks every
    /// available party with `base`; a strategy may select a subset
    /// (subsampling) or configure parties differently.
    fn configure_fit(&mut self, ctx: &RoundContext<'_>, base: &FitConfig) -> Vec<FitInstruction> {
        ctx.available.iter().map(|p| FitInstruction { party: p.clone(), config: base.clone() }).collect()
    }

    /// The next global model from the parties' updates. `results` have passed
    /// [`check_update`] and are sorted by party name, so floating-point sums
    /// happen in a reproducible order.
    fn aggregate_fit(&mut self, round: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error>;

    /// The next global model from a secure aggregate: `weighted_delta_sum` is
    /// Σ nᵢ·(localᵢ − global) over the surviving parties and `total_examples`
    /// is Σ nᵢ. Secure aggregation reveals nothing else, so strategies that
    /// need individual updates (median, Krum, …) keep this default refusal.
    fn aggregate_secure_sum(
        &mut self,
        _round: u32,
        _global: &Parameters,
        _weighted_delta_sum: &[f64],
        _total_examples: f64,
    ) -> Result<Parameters, Error> {
        Err(Error::InvalidInput(format!(
            "strategy {} needs individual updates; secure aggregation reveals only their sum",
            self.name()
        )))
    }

    /// Round metrics from the parties' evaluations: by default the
    /// example-weighted mean of the loss and of every metric all parties report.
    fn aggregate_evaluate(&mut self, _round: u32, results: &[EvalResult]) -> Result<Metrics, Error> {
        weighted_metrics(results)
    }

    /// What the strategy carries from round to round (server momentum,
    /// adaptive moments), saved atomically with each checkpoint so that a
    /// job resumed after a crash continues exactly. Stateless by default.
    fn state(&self) -> Result<State, Error> {
        Ok(State::default())
    }

    /// Restores what [`Strategy::state`] saved. The default accepts only
    /// an empty state, so a checkpoint from a stateful strategy is not
    /// silently dropped.
    fn restore(&mut self, state: &State) -> Result<(), Error> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "strategy {} keeps no state, but the checkpoint holds {}",
                self.name(),
                state.names().collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// Example-weighted means of loss and of the metrics every result carries.
pub fn weighted_metrics(results: &[EvalResult]) -> Result<Metrics, Error> {
    // In u128: counts are the parties' word, and a u64 sum could wrap.
    let total: u128 = results.iter().map(|r| u128::from(r.num_examples)).sum();
    if total == 0 {
        return Err(Error::EmptyAggregation("no evaluation examples".into()));
    }
    let mut out = Metrics::new();
    // A NaN loss is one not reported (a DP evaluation releases none).
    if results.iter().all(|r| !r.loss.is_nan()) {
        out.insert("loss".into(), results.iter().map(|r| r.loss * r.num_examples as f64).sum::<f64>() / total as f64);
    }
    if let Some(first) = results.first() {
        for key in first.metrics.keys() {
            if results.iter().all(|r| r.metrics.contains_key(key)) {
                let s: f64 = results.iter().map(|r| r.metrics[key] * r.num_examples as f64).sum();
                out.insert(key.clone(), s / total as f64);
            }
        }
    }
    out.insert("num_examples".into(), total as f64);
    // (Reported values are bounded, so these are finite; a mean that is not
    // would be stored as null and the job's records would not read back.)
    out.retain(|_, v| v.is_finite());
    Ok(out)
}

/// Federated averaging (McMahan et al., 2017): the example-weighted mean of
/// the parties' parameters, accumulated in f64.
#[derive(Debug, Clone, Default)]
pub struct FedAvg;

impl FedAvg {
    /// The weighted mean of `results`' parameters; shared by strategies that
    /// post-process the average (server optimisers).
    pub fn weighted_mean(global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        // In u128: counts are the parties' word, and a u64 sum could wrap.
        let total: u128 = results.iter().map(|r| u128::from(r.num_examples)).sum();
        if results.is_empty() || total == 0 {
            return Err(Error::EmptyAggregation("no party updates with examples".into()));
        }
        let spec = global.spec();
        // Tensor by tensor, in loops over slices that vectorise (an iterator
        // over the flattened model does not); the same sums in the same order.
        let mut acc: Vec<Vec<f64>> = global.tensors().iter().map(|t| vec![0f64; t.data.len()]).collect();
        for r in results {
            check_update(&spec, r)?;
            let w = r.num_examples as f64 / total as f64;
            for (a, t) in acc.iter_mut().zip(r.params.tensors()) {
                a.iter_mut().zip(&t.data).for_each(|(a, &v)| *a += w * f64::from(v));
            }
        }
        let mut out = global.clone();
        for ((_, values), a) in out.values_mut().zip(&acc) {
            values.iter_mut().zip(a).for_each(|(v, &a)| *v = a as f32);
        }
        Ok(out)
    }
}

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ANY
    }

    fn aggregate_fit(&mut self, _round: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        FedAvg::weighted_mean(global, results)
    }

    fn aggregate_secure_sum(
        &mut self,
        _round: u32,
        global: &Parameters,
        weighted_delta_sum: &[f64],
        total_examples: f64,
    ) -> Result<Parameters, Error> {
        if weighted_delta_sum.len() != global.num_values() {
            return Err(Error::InvalidInput(format!(
                "secure sum of {} values for a model of {}",
                weighted_delta_sum.len(),
                global.num_values()
            )));
        }
        if !(total_examples.is_finite() && total_examples > 0.0) {
            return Err(Error::EmptyAggregation("no examples in the secure sum".into()));
        }
        // Tensor by tensor, in place in a copy of the model (loops over
        // slices vectorise; an iterator over the flattened model does not).
        let mut out = global.clone();
        let mut at = 0;
        for (_, values) in out.values_mut() {
            let deltas = &weighted_delta_sum[at..at + values.len()];
            values.iter_mut().zip(deltas).for_each(|(v, d)| *v = (f64::from(*v) + d / total_examples) as f32);
            at += values.len();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;

    fn params(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }

    fn result(party: &str, n: u64, v: &[f32]) -> FitResult {
        FitResult { party: party.into(), num_examples: n, params: params(v), metrics: Metrics::new() }
    }

    /// Counts are the parties' word: sums of them do not wrap (a u64 sum of
    /// u64::MAX − 99 and 100 was 0, then weights of 1.8e19 and an infinite
    /// model), and reported metrics are bounded, proportions to [0, 1].
    #[test]
    fn counts_near_u64_max_do_not_wrap_and_reported_metrics_are_bounded() {
        let huge = [result("a", u64::MAX - 99, &[1.0]), result("b", 100, &[3.0])];
        let mean = FedAvg::weighted_mean(&params(&[0.0]), &huge).unwrap();
        assert!(mean.tensors()[0].data[0].is_finite() && (mean.tensors()[0].data[0] - 1.0).abs() < 1e-6);
        let eval = |p: &str, n: u64, acc: f64| EvalResult {
            party: p.into(),
            num_examples: n,
            loss: 0.5,
            metrics: [("accuracy".to_string(), acc)].into(),
        };
        let m = weighted_metrics(&[eval("a", u64::MAX - 99, 0.5), eval("b", 100, 1.0)]).unwrap();
        assert!(m.values().all(|v| v.is_finite()) && (m["accuracy"] - 0.5).abs() < 1e-9, "{m:?}");
        let ok: Metrics = [("accuracy".to_string(), 1.0), ("loss_like".to_string(), -1e12)].into();
        assert!(check_reported_metrics("hospital-q", &ok).is_ok());
        for (k, v) in [("accuracy", 1.0 + 1e-9), ("auc", -0.1), ("train_loss", 1.7e308), ("x", f64::NAN)] {
            let e = check_reported_metrics("hospital-q", &[(k.to_string(), v)].into()).unwrap_err().to_string();
            assert!(e.contains("hospital-q") && e.contains(k), "{k}: {e}");
        }
    }

    #[test]
    fn fedavg_is_the_example_weighted_mean() {
        let g = params(&[0.0, 0.0]);
        let out = FedAvg.aggregate_fit(1, &g, &[result("a", 1, &[1.0, 2.0]), result("b", 3, &[5.0, -2.0])]).unwrap();
        // (1*1 + 3*5)/4 = 4, (1*2 + 3*-2)/4 = -1
        assert_eq!(out.tensors()[0].data, vec![4.0, -1.0]);
    }

    #[test]
    fn fedavg_names_the_bad_party() {
        let g = params(&[0.0, 0.0]);
        let err = FedAvg
            .aggregate_fit(1, &g, &[result("a", 1, &[1.0, 2.0]), result("evil", 1, &[f32::NAN, 0.0])])
            .unwrap_err();
        assert!(matches!(err, Error::PeerMisbehaved { ref party, .. } if party == "evil"), "{err}");
        let err = FedAvg.aggregate_fit(1, &g, &[result("short", 1, &[1.0])]).unwrap_err();
        assert!(err.to_string().contains("short"));
        assert!(FedAvg.aggregate_fit(1, &g, &[]).is_err());
    }

    #[test]
    fn fedavg_of_a_secure_sum_matches_the_plain_weighted_mean() {
        let g = params(&[1.0, 1.0]);
        // deltas (1,1)x1 and (5,-3)x3 from global (1,1): sum = (16, -8), total 4
        let out = FedAvg.aggregate_secure_sum(1, &g, &[16.0, -8.0], 4.0).unwrap();
        let plain = FedAvg.aggregate_fit(1, &g, &[result("a", 1, &[2.0, 2.0]), result("b", 3, &[6.0, -2.0])]).unwrap();
        assert_eq!(out, plain);
        assert!(FedAvg.aggregate_secure_sum(1, &g, &[1.0], 4.0).is_err());
        assert!(FedAvg.aggregate_secure_sum(1, &g, &[1.0, 1.0], 0.0).is_err());
    }

    /// Over several tensors, both means are the flat formulas bit for bit:
    /// each value's sum over the parties in order, then one rounding to f32.
    #[test]
    fn fedavg_means_over_several_tensors_are_the_flat_formulas() {
        let model = |f: &dyn Fn(usize) -> f32| {
            Parameters::new(vec![
                Tensor { name: "w".into(), shape: vec![3, 5], data: (0..15).map(f).collect() },
                Tensor { name: "b".into(), shape: vec![7], data: (15..22).map(f).collect() },
            ])
            .unwrap()
        };
        let global = model(&|i| (i as f32 * 0.37).sin());
        let results: Vec<FitResult> = (0..3)
            .map(|p| FitResult {
                party: format!("p{p}"),
                num_examples: 10 + 7 * p as u64,
                params: model(&|i| (i as f32 * 0.37 + p as f32).cos() * 1e-3 + 0.5),
                metrics: Default::default(),
            })
            .collect();
        let total: u64 = results.iter().map(|r| r.num_examples).sum();
        let mut want = vec![0f64; 22];
        for r in &results {
            let w = r.num_examples as f64 / total as f64;
            want.iter_mut().zip(r.params.flat_values()).for_each(|(a, v)| *a += w * f64::from(v));
        }
        let got: Vec<f32> = FedAvg::weighted_mean(&global, &results).unwrap().flat_values().collect();
        assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == (*w as f32).to_bits()), "{got:?}");
        let deltas: Vec<f64> = (0..22).map(|i| (i as f64 - 11.0) * 0.013).collect();
        let sum = FedAvg.aggregate_secure_sum(1, &global, &deltas, 3.0).unwrap();
        for ((g, d), s) in global.flat_values().zip(&deltas).zip(sum.flat_values()) {
            assert_eq!(s.to_bits(), ((f64::from(g) + d / 3.0) as f32).to_bits());
        }
        assert_eq!(sum.spec(), global.spec());
    }

    #[test]
    fn weighted_metrics_average_by_examples() {
        let r = |n, loss, acc| EvalResult {
            party: "p".into(),
            num_examples: n,
            loss,
            metrics: [("accuracy".to_string(), acc)].into(),
        };
        let m = weighted_metrics(&[r(1, 1.0, 0.5), r(3, 2.0, 1.0)]).unwrap();
        assert_eq!(m["loss"], 1.75);
        assert_eq!(m["accuracy"], 0.875);
    }
}
