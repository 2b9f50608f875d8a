//! A custom aggregation [`Strategy`] in a coordinator build of your own.
//!
//! `DecayingFedAvg` is FedAvg whose local learning rate decays every round,
//! η_t = η · γ^(t−1): large early steps, then smaller ones as the parties'
//! models settle (a schedule that helps non-IID federations converge). It
//! only reshapes the configuration and averages, so it also runs under secure
//! aggregation.
//!
//! This file is a complete `confide` binary: the same CLI (`coordinator
//! serve`, `job submit`, …) with one more strategy registered. A job selects it
//! with
//!
//! ```toml
//! [strategy]
//! name = "custom"
//! custom = "lr-decay"
//! options = { gamma = 0.8 }
//! ```
//!
//! Run it where you would run `confide`:
//! `cargo run -p confide-tests --example custom_strategy -- coordinator serve --config coordinator.toml`.
//! `tests/tests/examples.rs` runs it in a federation in CI.

use confide_algorithms::{Error, FedAvg, FitConfig, FitResult, Parameters, Strategy};
use confide_coordinator::plugins::Plugins;

/// FedAvg with an exponentially decaying local learning rate.
struct DecayingFedAvg {
    /// γ, the per-round factor.
    gamma: f64,
}

impl Strategy for DecayingFedAvg {
    fn name(&self) -> &'static str {
        "lr-decay"
    }

    /// Every fit round starts from the spec's `[training]` table (`base`);
    /// only the learning rate changes.
    fn configure_fit(&mut self, round: u32, base: &FitConfig) -> FitConfig {
        let mut cfg = FitConfig { round, ..base.clone() };
        cfg.train.learning_rate *= self.gamma.powi(round.saturating_sub(1) as i32);
        cfg
    }

    /// Plaintext mode: the example-weighted mean of the parties' models.
    fn aggregate_fit(&mut self, round: u32, global: &Parameters, results: &[FitResult]) -> Result<Parameters, Error> {
        FedAvg.aggregate_fit(round, global, results)
    }

    /// Secure aggregation: only Σ nᵢ·(localᵢ − global) and Σ nᵢ are revealed,
    /// which is all a weighted mean needs.
    fn aggregate_secure_sum(
        &mut self,
        round: u32,
        global: &Parameters,
        weighted_delta_sum: &[f64],
        total_examples: f64,
    ) -> Result<Parameters, Error> {
        FedAvg.aggregate_secure_sum(round, global, weighted_delta_sum, total_examples)
    }
}

fn main() {
    let plugins = Plugins::new().strategy("lr-decay", |spec| {
        let gamma = spec.strategy.options.get("gamma").copied().unwrap_or(0.9);
        if !(gamma > 0.0 && gamma <= 1.0) {
            return Err(format!("gamma must be in (0, 1] (got {gamma})"));
        }
        if let Some(unknown) = spec.strategy.options.keys().find(|k| *k != "gamma") {
            return Err(format!("unknown option {unknown:?} (lr-decay takes gamma)"));
        }
        Ok(Box::new(DecayingFedAvg { gamma }))
    });
    confide_coordinator::cli::main_with(plugins)
}
