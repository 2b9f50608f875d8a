//! Server-side optimisers and robust aggregation rules.
//!
//! * [`FedProx`] (Li et al., MLSys 2020): FedAvg aggregation; each party adds
//!   the proximal term μ/2·‖w − w_global‖² to its local loss.
//! * [`FedAvgM`], [`FedOpt`] (FedAdagrad, FedYogi, FedAdam; Reddi et al.,
//!   ICLR 2021): functions of the example-weighted mean update, so they also
//!   run under secure aggregation.
//! * [`Median`], [`TrimmedMean`], [`Krum`]: robust rules that need every
//!   individual update; plaintext mode only.

use crate::strategy::{Capabilities, FedAvg, FitInstruction, FitResult, RoundContext, check_update};
use crate::{Error, FitConfig, Parameters, State, Strategy};

/// The mean update Δ = weighted_mean − global, in f64.
fn mean_delta(global: &Parameters, results: &[FitResult]) -> Result<Vec<f64>, Error> {
    let avg = FedAvg::weighted_mean(global, results)?;
    Ok(avg.flat_values().zip(global.flat_values()).map(|(a, g)| f64::from(a) - f64::from(g)).collect())
}

/// `global + step`, as parameters.
fn apply(global: &Parameters, step: &[f64]) -> Result<Parameters, Error> {
    let flat: Vec<f32> = global.flat_values().zip(step).map(|(g, s)| (f64::from(g) + s) as f32).collect();
    Parameters::from_flat(&global.spec(), &flat)
}

fn secure_delta(global: &Parameters, sum: &[f64], total: f64) -> Result<Vec<f64>, Error> {
    if sum.len() != global.num_values() || !(total.is_finite() && total > 0.0) {
        return Err(Error::InvalidInput("secure sum does not match the model".into()));
    }
    Ok(sum.iter().map(|s| s / total).collect())
}

/// A server optimiser: turns the mean update Δ into the next global model.
/// Every such rule is a function of the weighted mean, so one blanket
/// [`Strategy`] impl serves it in plaintext and under secure aggregation.
pub trait ServerOptimizer: Send {
    /// Short name used in logs and job status.
    fn name(&self) -> &'static str;
    /// The next global model from the mean update `delta`.
    fn step(&mut self, global: &Parameters, delta: Vec<f64>) -> Result<Parameters, Error>;
    /// The optimiser's moments, for checkpoints.
    fn state(&self) -> State;
    /// Restores [`ServerOptimizer::state`].
    fn restore(&mut self, state: &State) -> Result<(), Error>;
}

impl<T: ServerOptimizer> Strategy for T {
    fn name(&self) -> &str {
        ServerOptimizer::name(self)
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ANY
    }
    fn state(&self) -> Result<State, Error> {
        Ok(ServerOptimizer::state(self))
    }
    fn restore(&mut self, state: &State) -> Result<(), Error> {
        ServerOptimizer::restore(self, state)
    }
    fn aggregate_fit(&mut self, _: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        let d = mean_delta(global, results)?;
        self.step(global, d)
    }
    fn aggregate_secure_sum(
        &mut self,
        _: u32,
        global: &Parameters,
        sum: &[f64],
        total: f64,
    ) -> Result<Parameters, Error> {
        let d = secure_delta(global, sum, total)?;
        self.step(global, d)
    }
}

/// FedProx: FedAvg's aggregation, with every fit round telling the parties to
/// add μ/2·‖w − w_global‖² to their local loss, which keeps heterogeneous
/// parties' local models near the global one.
#[derive(Debug, Clone)]
pub struct FedProx {
    /// μ, the weight of the proximal term.
    pub proximal_mu: f64,
}

impl Strategy for FedProx {
    fn name(&self) -> &str {
        "fedprox"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ANY
    }
    fn configure_fit(&mut self, ctx: &RoundContext<'_>, base: &FitConfig) -> Vec<FitInstruction> {
        let mut config = base.clone();
        config.train.proximal_mu = self.proximal_mu;
        ctx.available.iter().map(|p| FitInstruction { party: p.clone(), config: config.clone() }).collect()
    }
    fn aggregate_fit(&mut self, round: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        FedAvg.aggregate_fit(round, global, results)
    }
    fn aggregate_secure_sum(
        &mut self,
        round: u32,
        global: &Parameters,
        sum: &[f64],
        total: f64,
    ) -> Result<Parameters, Error> {
        FedAvg.aggregate_secure_sum(round, global, sum, total)
    }
}

/// FedAvg with server momentum (Hsu et al., 2019): v ← βv + Δ; w ← w + ηv.
#[derive(Debug, Clone)]
pub struct FedAvgM {
    /// Server learning rate η.
    pub server_lr: f64,
    /// Momentum β.
    pub momentum: f64,
    velocity: Option<Vec<f64>>,
}

impl FedAvgM {
    /// A new optimiser with zero velocity.
    pub fn new(server_lr: f64, momentum: f64) -> Self {
        FedAvgM { server_lr, momentum, velocity: None }
    }
}

impl ServerOptimizer for FedAvgM {
    fn name(&self) -> &'static str {
        "fedavgm"
    }

    fn step(&mut self, global: &Parameters, delta: Vec<f64>) -> Result<Parameters, Error> {
        let v = self.velocity.get_or_insert_with(|| vec![0.0; delta.len()]);
        for (vi, d) in v.iter_mut().zip(&delta) {
            *vi = self.momentum * *vi + d;
        }
        if v.len() != delta.len() {
            return Err(Error::InvalidInput(format!(
                "fedavgm: restored velocity of {} values for a model of {}",
                v.len(),
                delta.len()
            )));
        }
        let step: Vec<f64> = v.iter().map(|vi| self.server_lr * vi).collect();
        apply(global, &step)
    }

    fn state(&self) -> State {
        let mut s = State::new();
        if let Some(v) = &self.velocity {
            s.insert("velocity", v.clone());
        }
        s
    }

    fn restore(&mut self, state: &State) -> Result<(), Error> {
        self.velocity = state.get("velocity").map(<[f64]>::to_vec);
        match state.names().find(|n| *n != "velocity") {
            Some(other) => Err(Error::InvalidInput(format!("fedavgm: unknown state {other:?}"))),
            None => Ok(()),
        }
    }
}

/// Which adaptive server optimiser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adaptive {
    /// v ← v + Δ².
    Adagrad,
    /// v ← v − (1 − β₂) Δ² sign(v − Δ²).
    Yogi,
    /// v ← β₂ v + (1 − β₂) Δ².
    Adam,
}

/// Adaptive federated optimisation (Reddi et al., ICLR 2021):
/// m ← β₁m + (1 − β₁)Δ, v per [`Adaptive`], w ← w + η m / (√v + τ),
/// with m₀ = 0 and v₀ = τ².
#[derive(Debug, Clone)]
pub struct FedOpt {
    /// Which update of v.
    pub kind: Adaptive,
    /// Server learning rate η.
    pub server_lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// Adaptivity τ.
    pub tau: f64,
    state: Option<(Vec<f64>, Vec<f64>)>,
}

impl FedOpt {
    /// A new optimiser.
    pub fn new(kind: Adaptive, server_lr: f64, beta1: f64, beta2: f64, tau: f64) -> Self {
        FedOpt { kind, server_lr, beta1, beta2, tau, state: None }
    }
}

impl ServerOptimizer for FedOpt {
    fn name(&self) -> &'static str {
        match self.kind {
            Adaptive::Adagrad => "fedadagrad",
            Adaptive::Yogi => "fedyogi",
            Adaptive::Adam => "fedadam",
        }
    }

    fn step(&mut self, global: &Parameters, delta: Vec<f64>) -> Result<Parameters, Error> {
        let tau2 = self.tau * self.tau;
        let name = ServerOptimizer::name(self);
        let (m, v) = self.state.get_or_insert_with(|| (vec![0.0; delta.len()], vec![tau2; delta.len()]));
        if m.len() != delta.len() || v.len() != delta.len() {
            return Err(Error::InvalidInput(format!(
                "{name}: restored moments of {} values for a model of {}",
                m.len(),
                delta.len()
            )));
        }
        let mut step = Vec::with_capacity(delta.len());
        for ((mi, vi), d) in m.iter_mut().zip(v.iter_mut()).zip(&delta) {
            *mi = self.beta1 * *mi + (1.0 - self.beta1) * d;
            let d2 = d * d;
            *vi = match self.kind {
                Adaptive::Adagrad => *vi + d2,
                Adaptive::Yogi => *vi - (1.0 - self.beta2) * d2 * (*vi - d2).signum(),
                Adaptive::Adam => self.beta2 * *vi + (1.0 - self.beta2) * d2,
            };
            step.push(self.server_lr * *mi / (vi.sqrt() + self.tau));
        }
        apply(global, &step)
    }

    fn state(&self) -> State {
        let mut s = State::new();
        if let Some((m, v)) = &self.state {
            s.insert("m", m.clone());
            s.insert("v", v.clone());
        }
        s
    }

    fn restore(&mut self, state: &State) -> Result<(), Error> {
        let name = ServerOptimizer::name(self);
        self.state = match (state.get("m"), state.get("v")) {
            (Some(m), Some(v)) => Some((m.to_vec(), v.to_vec())),
            (None, None) => None,
            _ => return Err(Error::InvalidInput(format!("{name}: the checkpoint holds only one of m and v"))),
        };
        match state.names().find(|n| !["m", "v"].contains(n)) {
            Some(other) => Err(Error::InvalidInput(format!("{name}: unknown state {other:?}"))),
            None => Ok(()),
        }
    }
}

/// Every update's values, checked, as rows.
fn rows(global: &Parameters, results: &[FitResult]) -> Result<Vec<Vec<f32>>, Error> {
    if results.is_empty() {
        return Err(Error::EmptyAggregation("no party updates".into()));
    }
    let spec = global.spec();
    results
        .iter()
        .map(|r| {
            check_update(&spec, r)?;
            Ok(r.params.flat_values().collect())
        })
        .collect()
}

/// Coordinate-wise median (Yin et al., 2018); the mean of the middle two for
/// an even count. Unweighted: robustness means one party, one vote.
#[derive(Debug, Clone, Default)]
pub struct Median;

impl Strategy for Median {
    fn name(&self) -> &str {
        "median"
    }
    fn aggregate_fit(&mut self, _: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        TrimmedMean { trim_fraction: 0.5 }.aggregate(global, results)
    }
}

/// Coordinate-wise trimmed mean: drop the ⌊βn⌋ smallest and largest values of
/// each coordinate, average the rest.
#[derive(Debug, Clone)]
pub struct TrimmedMean {
    /// β in [0, 0.5); 0.5 means the median.
    pub trim_fraction: f64,
}

impl TrimmedMean {
    fn aggregate(&self, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        let rows = rows(global, results)?;
        let n = rows.len();
        let mut k = ((self.trim_fraction * n as f64).floor() as usize).min((n - 1) / 2);
        if self.trim_fraction >= 0.5 {
            k = (n - 1) / 2;
        }
        let mut col = vec![0f32; n];
        let flat: Vec<f32> = (0..global.num_values())
            .map(|j| {
                for (c, r) in col.iter_mut().zip(&rows) {
                    *c = r[j];
                }
                col.sort_by(f32::total_cmp);
                let kept = &col[k..n - k];
                (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
            })
            .collect();
        Parameters::from_flat(&global.spec(), &flat)
    }
}

impl Strategy for TrimmedMean {
    fn name(&self) -> &str {
        "trimmed_mean"
    }
    fn aggregate_fit(&mut self, _: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        self.aggregate(global, results)
    }
}

/// Krum (Blanchard et al., 2017): the update whose summed squared distance to
/// its n − f − 2 nearest others is smallest, tolerating f Byzantine parties.
#[derive(Debug, Clone)]
pub struct Krum {
    /// Byzantine parties tolerated.
    pub byzantine: usize,
}

impl Strategy for Krum {
    fn name(&self) -> &str {
        "krum"
    }
    fn aggregate_fit(&mut self, _: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        let rows = rows(global, results)?;
        let n = rows.len();
        let needed = self.byzantine.saturating_mul(2).saturating_add(3);
        if n < needed {
            return Err(Error::InvalidInput(format!(
                "krum with {} byzantine parties needs at least {needed} updates (got {n})",
                self.byzantine
            )));
        }
        let m = n - self.byzantine - 2;
        let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>();
        let best = (0..n)
            .map(|i| {
                let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist(&rows[i], &rows[j])).collect();
                d.sort_by(f64::total_cmp);
                (d[..m].iter().sum::<f64>(), i)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, i)| i)
            .unwrap_or(0);
        Ok(results[best].params.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Metrics, Tensor};

    fn p(v: &[f32]) -> Parameters {
        Parameters::new(vec![Tensor { name: "w".into(), shape: vec![v.len()], data: v.to_vec() }]).unwrap()
    }
    fn r(party: &str, n: u64, v: &[f32]) -> FitResult {
        FitResult { party: party.into(), num_examples: n, params: p(v), metrics: Metrics::new() }
    }
    fn close(a: &Parameters, b: &[f32]) {
        for (x, y) in a.flat_values().zip(b) {
            assert!((x - y).abs() < 1e-6, "{:?} vs {b:?}", a.tensors()[0].data);
        }
    }

    #[test]
    fn fedprox_sets_mu_and_averages_like_fedavg() {
        let mut s = FedProx { proximal_mu: 0.25 };
        let base = FitConfig { round: 3, train: crate::TrainConfig::default() };
        let available = ["a".to_string(), "b".to_string()];
        let ctx = RoundContext { round: 3, rounds: 5, available: &available, min_parties: 2 };
        let plan = s.configure_fit(&ctx, &base);
        assert_eq!(plan.iter().map(|i| i.party.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let cfg = &plan[0].config;
        assert_eq!((cfg.round, cfg.train.proximal_mu), (3, 0.25));
        assert_eq!(cfg.train.learning_rate, base.train.learning_rate);
        let g = p(&[0.0, 0.0]);
        let out = s.aggregate_fit(1, &g, &[r("a", 1, &[1.0, 2.0]), r("b", 3, &[5.0, -2.0])]).unwrap();
        close(&out, &[4.0, -1.0]);
        let out = s.aggregate_secure_sum(1, &g, &[16.0, -4.0], 4.0).unwrap();
        close(&out, &[4.0, -1.0]);
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let mut s = FedAvgM::new(1.0, 0.9);
        let g = p(&[0.0]);
        // Δ = 1 each round: v1 = 1, v2 = 1.9
        let g1 = s.aggregate_fit(1, &g, &[r("a", 1, &[1.0])]).unwrap();
        close(&g1, &[1.0]);
        let g2 = s.aggregate_fit(2, &g1, &[r("a", 1, &[2.0])]).unwrap();
        close(&g2, &[2.9]);
        // η = 1, β = 0 is FedAvg; the secure path agrees.
        let mut plain = FedAvgM::new(1.0, 0.0);
        let a = plain.aggregate_fit(1, &g, &[r("a", 1, &[2.0]), r("b", 3, &[6.0])]).unwrap();
        close(&a, &[5.0]);
        let mut sec = FedAvgM::new(1.0, 0.0);
        close(&sec.aggregate_secure_sum(1, &g, &[20.0], 4.0).unwrap(), &[5.0]);
    }

    #[test]
    fn fedopt_variants_match_hand_computed_first_steps() {
        let g = p(&[0.0]);
        let res = [r("a", 1, &[0.5])]; // Δ = 0.5
        // m = 0.1·0.5 = 0.05 (β1 = 0.9); τ = 0.1 so v0 = 0.01
        // adagrad: v = 0.01 + 0.25 = 0.26; step = 1 · 0.05 / (0.5099 + 0.1)
        let mut s = FedOpt::new(Adaptive::Adagrad, 1.0, 0.9, 0.99, 0.1);
        close(&s.aggregate_fit(1, &g, &res).unwrap(), &[(0.05 / (0.26f64.sqrt() + 0.1)) as f32]);
        // adam: v = 0.99·0.01 + 0.01·0.25 = 0.0124
        let mut s = FedOpt::new(Adaptive::Adam, 1.0, 0.9, 0.99, 0.1);
        close(&s.aggregate_fit(1, &g, &res).unwrap(), &[(0.05 / (0.0124f64.sqrt() + 0.1)) as f32]);
        // yogi: v = 0.01 − 0.01·0.25·sign(0.01 − 0.25) = 0.0125
        let mut s = FedOpt::new(Adaptive::Yogi, 1.0, 0.9, 0.99, 0.1);
        close(&s.aggregate_fit(1, &g, &res).unwrap(), &[(0.05 / (0.0125f64.sqrt() + 0.1)) as f32]);
        let mut s = FedOpt::new(Adaptive::Adam, 1.0, 0.9, 0.99, 0.1);
        close(&s.aggregate_secure_sum(1, &g, &[0.5], 1.0).unwrap(), &[(0.05 / (0.0124f64.sqrt() + 0.1)) as f32]);
    }

    #[test]
    fn optimiser_state_restored_mid_run_continues_exactly() {
        let g = p(&[0.0, 1.0]);
        let rounds = |s: &mut dyn Strategy, from: u32, to: u32, mut g: Parameters| {
            for t in from..=to {
                let v = [t as f32 * 0.3, -(t as f32)];
                g = s.aggregate_fit(t, &g, &[r("a", 2, &v), r("b", 1, &[0.5, 0.5])]).unwrap();
            }
            g
        };
        let all: Vec<Box<dyn Fn() -> Box<dyn Strategy>>> = vec![
            Box::new(|| Box::new(FedAvgM::new(0.7, 0.9))),
            Box::new(|| Box::new(FedOpt::new(Adaptive::Adam, 0.1, 0.9, 0.99, 1e-3))),
            Box::new(|| Box::new(FedOpt::new(Adaptive::Yogi, 0.1, 0.9, 0.99, 1e-3))),
            Box::new(|| Box::new(FedOpt::new(Adaptive::Adagrad, 0.1, 0.9, 0.99, 1e-3))),
        ];
        for make in all {
            let mut straight = make();
            let want = rounds(straight.as_mut(), 1, 4, g.clone());
            let mut first = make();
            let mid = rounds(first.as_mut(), 1, 2, g.clone());
            let saved = State::from_safetensors(&first.state().unwrap().to_safetensors().unwrap()).unwrap();
            assert!(!saved.is_empty(), "{} saved nothing", first.name());
            let mut resumed = make();
            resumed.restore(&saved).unwrap();
            assert_eq!(rounds(resumed.as_mut(), 3, 4, mid), want, "{}", straight.name());
        }
        let mut bad = State::new();
        bad.insert("m", vec![0.0]);
        assert!(Strategy::restore(&mut FedOpt::new(Adaptive::Adam, 0.1, 0.9, 0.99, 1e-3), &bad).is_err());
        assert!(Median.restore(&bad).is_err(), "a stateless rule refuses state it cannot use");
    }

    #[test]
    fn robust_rules_resist_an_outlier_and_refuse_secure_sums() {
        let g = p(&[0.0, 0.0]);
        let res =
            [r("a", 1, &[1.0, 2.0]), r("b", 1, &[2.0, 3.0]), r("c", 1, &[3.0, 4.0]), r("evil", 100, &[1e6, -1e6])];
        // median of {1,2,3,1e6} = 2.5; of {2,3,4,-1e6} = 2.5
        close(&Median.aggregate_fit(1, &g, &res).unwrap(), &[2.5, 2.5]);
        // trim 1 of 4 each side: same middle two
        close(&TrimmedMean { trim_fraction: 0.25 }.aggregate_fit(1, &g, &res).unwrap(), &[2.5, 2.5]);
        let mut five = res.to_vec();
        five.push(r("d", 1, &[2.0, 3.0]));
        // Krum f = 1, m = 2: b and d coincide, so b (first) has the smallest score.
        close(&Krum { byzantine: 1 }.aggregate_fit(1, &g, &five).unwrap(), &[2.0, 3.0]);
        assert!(Krum { byzantine: 1 }.aggregate_fit(1, &g, &res).is_err());
        assert!(Median.aggregate_secure_sum(1, &g, &[1.0, 1.0], 1.0).is_err());
        let bad = [r("a", 1, &[1.0])];
        assert!(Median.aggregate_fit(1, &g, &bad).unwrap_err().to_string().contains("party a"));
    }
}
