//! What a coordinator build knows: strategies, aggregation protocols and job
//! kinds, built-in and registered. A researcher's own `confide` binary adds
//! to them (see `examples/custom_strategy.rs`; this example runs as the
//! unit test `registering_a_strategy_with_options_works_as_documented`,
//! since `make test` runs no doctests):
//!
//! ```ignore
//! use confide_coordinator::plugins::Plugins;
//! use confide_algorithms::{FedAvg, Strategy};
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Options { gamma: f64 }
//! // A real strategy would use `o.gamma`; FedAvg stands in for it here.
//! let plugins = Plugins::new().strategy_with_options("lr-decay", |o: Options, _spec| {
//!     if !(o.gamma > 0.0 && o.gamma <= 1.0) {
//!         return Err(format!("gamma must be in (0, 1] (got {})", o.gamma));
//!     }
//!     Ok(Box::new(FedAvg) as Box<dyn Strategy>)
//! });
//! assert!(plugins.has_strategy("lr-decay"));
//! ```
//!
//! A job spec selects a registered strategy with `[strategy] name = "custom"`,
//! `custom = "NAME"`, an extra protocol with `[aggregation] protocol =
//! "NAME"`, an extra job kind with `kind = "NAME"`. Every name, option and
//! capability is checked when the job is submitted.

use std::collections::BTreeMap;
use std::sync::Arc;

use confide_algorithms::{Capabilities, FedAvg, Strategy};
use confide_crypto::aggregation::{AggregationProtocol, PeerVerifier, Protocols, Reveals};
use confide_proto::jobspec::{JobSpec, StrategyConfig};

use crate::jobs::guard::guarded;
use crate::jobs::{EvaluateKind, IncrementalKind, JobKind, TrainKind};

/// Builds a registered strategy for a job.
pub type StrategyFactory = Arc<dyn Fn(&JobSpec) -> Result<Box<dyn Strategy>, String> + Send + Sync>;

/// Builds the verifier of the parties' certificates and signatures that
/// each job's aggregation protocol uses.
pub type PeerVerifierFactory = Arc<dyn Fn() -> Result<Box<dyn PeerVerifier>, String> + Send + Sync>;

/// The strategies, protocols and job kinds of a coordinator build.
#[derive(Clone)]
pub struct Plugins {
    strategies: BTreeMap<String, StrategyFactory>,
    protocols: Protocols,
    kinds: BTreeMap<String, Arc<dyn JobKind>>,
    peers: Option<PeerVerifierFactory>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins")
            .field("strategies", &self.strategies.keys().collect::<Vec<_>>())
            .field("protocols", &self.protocols)
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Default for Plugins {
    fn default() -> Self {
        Plugins { strategies: BTreeMap::new(), protocols: Protocols::default(), kinds: BTreeMap::new(), peers: None }
            .job_kind(TrainKind)
            .job_kind(EvaluateKind)
            .job_kind(IncrementalKind)
    }
}

/// The built-in strategy a spec names; `None` for `custom`.
pub fn builtin_strategy(config: &StrategyConfig) -> Option<Box<dyn Strategy>> {
    use confide_algorithms::strategies::{Adaptive, FedAvgM, FedOpt, FedProx, Krum, Median, TrimmedMean};
    let adaptive = |kind, a: &confide_proto::jobspec::AdaptiveSettings| {
        Box::new(FedOpt::new(kind, a.server_learning_rate, a.beta1, a.beta2, a.tau)) as Box<dyn Strategy>
    };
    Some(match config {
        StrategyConfig::FedAvg => Box::new(FedAvg),
        StrategyConfig::FedProx { proximal_mu } => Box::new(FedProx { proximal_mu: *proximal_mu }),
        StrategyConfig::FedAvgM { server_learning_rate, momentum } => {
            Box::new(FedAvgM::new(*server_learning_rate, *momentum))
        }
        StrategyConfig::FedAdagrad(a) => adaptive(Adaptive::Adagrad, a),
        StrategyConfig::FedYogi(a) => adaptive(Adaptive::Yogi, a),
        StrategyConfig::FedAdam(a) => adaptive(Adaptive::Adam, a),
        StrategyConfig::Median => Box::new(Median),
        StrategyConfig::TrimmedMean { trim_fraction } => Box::new(TrimmedMean { trim_fraction: *trim_fraction }),
        StrategyConfig::Krum { byzantine } => Box::new(Krum { byzantine: *byzantine }),
        _ => return None,
    })
}

impl Plugins {
    /// The built-in strategies, protocols (`none`, `secagg`, `he`) and kinds (`train`, `evaluate`,
    /// `incremental`).
    pub fn new() -> Self {
        Plugins::default()
    }

    /// Registers `build` as the strategy `name`; it reads the spec (its
    /// `[strategy] options` table) itself.
    pub fn strategy(
        mut self,
        name: &str,
        build: impl Fn(&JobSpec) -> Result<Box<dyn Strategy>, String> + Send + Sync + 'static,
    ) -> Self {
        self.strategies.insert(name.to_owned(), Arc::new(build));
        self
    }

    /// Registers the strategy `name` with typed options: the spec's
    /// `[strategy] options` table is deserialised into `O` (a type error or
    /// an unknown option is reported at `strategy.options.FIELD`), then
    /// handed to `build`.
    pub fn strategy_with_options<O: serde::de::DeserializeOwned + 'static>(
        self,
        name: &str,
        build: impl Fn(O, &JobSpec) -> Result<Box<dyn Strategy>, String> + Send + Sync + 'static,
    ) -> Self {
        self.strategy(name, move |spec| {
            let StrategyConfig::Custom { options, .. } = &spec.strategy else {
                return Err("this strategy is selected with name = \"custom\"".into());
            };
            let opts: O = serde_path_to_error::deserialize(toml::Value::Table(options.clone())).map_err(|e| {
                let path = e.path().to_string();
                let msg = e.into_inner().to_string().split_whitespace().collect::<Vec<_>>().join(" ");
                if path == "." { msg } else { format!("{path}: {msg}") }
            })?;
            build(opts, spec)
        })
    }

    /// Registers an aggregation protocol (replacing a built-in one of the same name).
    pub fn protocol(mut self, protocol: impl AggregationProtocol) -> Self {
        self.protocols = self.protocols.with(protocol);
        self
    }

    /// Registers a job kind.
    pub fn job_kind(mut self, kind: impl JobKind) -> Self {
        self.kinds.insert(kind.name().to_owned(), Arc::new(kind));
        self
    }

    /// Sets how jobs verify the parties' certificates and signatures. The
    /// coordinator's server always installs the federation CA's verifier
    /// ([`confide_crypto::identity::CertVerifier`]); this is for tests and
    /// tools that drive sessions without it.
    pub fn peer_verifier(
        mut self,
        build: impl Fn() -> Result<Box<dyn PeerVerifier>, String> + Send + Sync + 'static,
    ) -> Self {
        self.peers = Some(Arc::new(build));
        self
    }

    /// A verifier for one job; an error when none was set, so that no job
    /// runs a protocol with its peers unchecked.
    pub fn new_peer_verifier(&self) -> Result<Box<dyn PeerVerifier>, String> {
        match &self.peers {
            Some(build) => build(),
            None => Err("no verifier of the parties' certificates is configured".into()),
        }
    }

    /// Whether a strategy `name` is registered.
    pub fn has_strategy(&self, name: &str) -> bool {
        self.strategies.contains_key(name)
    }

    /// The aggregation protocols.
    pub fn protocols(&self) -> &Protocols {
        &self.protocols
    }

    /// The job kind `name`.
    pub fn kind(&self, name: &str) -> Option<&Arc<dyn JobKind>> {
        self.kinds.get(name)
    }

    /// The strategy `spec` asks for, built-in or registered. The error is
    /// `field: reason`, for the spec's error report.
    pub fn build_strategy(&self, spec: &JobSpec) -> Result<Box<dyn Strategy>, String> {
        if let Some(s) = builtin_strategy(&spec.strategy) {
            return Ok(s);
        }
        let StrategyConfig::Custom { name, .. } = &spec.strategy else {
            return Ok(Box::new(FedAvg));
        };
        let build = self.strategies.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.strategies.keys().map(String::as_str).collect();
            format!(
                "strategy.custom: no strategy named {name:?} is registered with this coordinator (registered: {})",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            )
        })?;
        guarded(&format!("strategy {name}"), "its factory", || build(spec))?
            .map_err(|e| format!("strategy.options: {name}: {e}"))
    }

    /// Builds the spec's strategy and checks that it can aggregate what the
    /// spec's protocol reveals, so an incompatible job is refused at
    /// submission rather than after its first round.
    pub fn check_strategy(&self, spec: &JobSpec) -> Result<(), String> {
        let strategy = self.build_strategy(spec)?;
        let name = guarded("a strategy", "name", || strategy.name().to_owned())?;
        let caps: Capabilities = guarded(&format!("strategy {name}"), "capabilities", || strategy.capabilities())?;
        let protocol = &spec.aggregation.protocol;
        let field =
            if matches!(spec.strategy, StrategyConfig::Custom { .. }) { "strategy.custom" } else { "strategy.name" };
        match self.protocols.get(protocol).map(|p| p.reveals()) {
            None => Err(format!("aggregation.protocol: no protocol named {protocol:?} in this coordinator")),
            Some(Reveals::WeightedSum) if !caps.weighted_sum => Err(format!(
                "{field}: strategy {name} needs individual updates, but aggregation protocol {protocol:?} reveals only their weighted sum"
            )),
            Some(Reveals::Updates) if !caps.individual_updates => Err(format!(
                "{field}: strategy {name} aggregates only weighted sums, but aggregation protocol {protocol:?} reveals individual updates"
            )),
            Some(_) => Ok(()),
        }
    }

    /// Everything this build checks at submission: the kind is registered
    /// and accepts the spec (its strategy, protocol, options).
    pub fn check(&self, spec: &JobSpec) -> Result<(), String> {
        let kind = spec.kind.as_str();
        let k = self.kinds.get(kind).ok_or_else(|| {
            let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
            format!("kind: no job kind named {kind:?} in this coordinator (known: {})", known.join(", "))
        })?;
        if self.protocols.get(&spec.aggregation.protocol).is_none() {
            return Err(format!(
                "aggregation.protocol: no protocol named {:?} in this coordinator (known: {})",
                spec.aggregation.protocol,
                self.protocols.names().join(", ")
            ));
        }
        k.check(spec, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_algorithms::{FedAvg, Strategy};

    /// The module's documented example, run (and its option checked).
    #[test]
    fn registering_a_strategy_with_options_works_as_documented() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Options {
            gamma: f64,
        }
        let plugins = Plugins::new().strategy_with_options("lr-decay", |o: Options, _spec| {
            if !(o.gamma > 0.0 && o.gamma <= 1.0) {
                return Err(format!("gamma must be in (0, 1] (got {})", o.gamma));
            }
            Ok(Box::new(FedAvg) as Box<dyn Strategy>)
        });
        assert!(plugins.has_strategy("lr-decay"));
        assert!(!plugins.has_strategy("lr-decay-2"));
    }
}
