//! Extension points of a coordinator build. A researcher registers their own
//! [`Strategy`] by name in their own `confide` binary (see
//! `examples/custom_strategy.rs`), and job specs select it with
//! `[strategy] name = "custom"`, `custom = "NAME"`.

use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::Strategy;
use confide_proto::jobspec::JobSpec;

use crate::session::strategy_for;

/// Builds a registered strategy for a job (it may read `strategy.options`).
pub type StrategyFactory = Arc<dyn Fn(&JobSpec) -> Result<Box<dyn Strategy>, String> + Send + Sync>;

/// The strategies a coordinator build adds to the built-in ones.
#[derive(Clone, Default)]
pub struct Plugins {
    strategies: BTreeMap<String, StrategyFactory>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins").field("strategies", &self.strategies.keys().collect::<Vec<_>>()).finish()
    }
}

impl Plugins {
    /// No plugins: the built-in strategies only.
    pub fn new() -> Self {
        Plugins::default()
    }

    /// Registers `build` as the strategy `name`.
    pub fn strategy(
        mut self,
        name: &str,
        build: impl Fn(&JobSpec) -> Result<Box<dyn Strategy>, String> + Send + Sync + 'static,
    ) -> Self {
        self.strategies.insert(name.to_owned(), Arc::new(build));
        self
    }

    /// The strategy `spec` asks for, built-in or registered. The error is
    /// `field: reason`, for the spec's error report.
    pub fn build(&self, spec: &JobSpec) -> Result<Box<dyn Strategy>, String> {
        if let Some(s) = strategy_for(spec) {
            return Ok(s);
        }
        let name = spec.strategy.custom.as_deref().unwrap_or_default();
        let build = self.strategies.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.strategies.keys().map(String::as_str).collect();
            format!(
                "strategy.custom: no strategy named {name:?} is registered with this coordinator (registered: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )
        })?;
        build(spec).map_err(|e| format!("strategy.options: {name}: {e}"))
    }
}
