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

use confide_algorithms::{
    Capabilities, Error, FedAvg, FitConfig, FitInstruction, FitResult, Parameters, RoundContext, Strategy,
};
use confide_coordinator::plugins::Plugins;

/// FedAvg with an exponentially decaying local learning rate.
struct DecayingFedAvg {
    /// γ, the per-round factor.
    gamma: f64,
}

impl Strategy for DecayingFedAvg {
    fn name(&self) -> &str {
        "lr-decay"
    }

    /// It averages, so it runs on individual updates and on secure sums
    /// alike; declaring it lets `confide job submit` accept it under
    /// `secagg` (a strategy that declares less is refused there).
    fn capabilities(&self) -> Capabilities {
        Capabilities::ANY
    }

    /// Every fit round starts from the spec's `[training]` table (`base`);
    /// only the learning rate changes. Every available party takes part; a
    /// strategy could select a subset here.
    fn configure_fit(&mut self, ctx: &RoundContext<'_>, base: &FitConfig) -> Vec<FitInstruction> {
        let mut config = base.clone();
        config.train.learning_rate *= self.gamma.powi(ctx.round.saturating_sub(1) as i32);
        ctx.available.iter().map(|p| FitInstruction { party: p.clone(), config: config.clone() }).collect()
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

/// `[strategy] options` of a job that selects `lr-decay`: typed, so a
/// wrong type or an unknown option is refused at `strategy.options.FIELD`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// γ, default 0.9.
    #[serde(default = "default_gamma")]
    gamma: f64,
}

fn default_gamma() -> f64 {
    0.9
}

fn main() {
    let plugins = Plugins::new().strategy_with_options("lr-decay", |o: Options, _spec| {
        if !(o.gamma > 0.0 && o.gamma <= 1.0) {
            return Err(format!("gamma must be in (0, 1] (got {})", o.gamma));
        }
        Ok(Box::new(DecayingFedAvg { gamma: o.gamma }))
    });
    confide_coordinator::cli::main_with(plugins)
}
