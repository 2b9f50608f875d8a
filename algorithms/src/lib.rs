//! Federated learning algorithms of Confide, independent of any transport.
//!
//! * [`Parameters`]: a model as named tensors in a fixed order, with the
//!   checks (shape, size, finiteness) every update passes before aggregation.
//! * [`Strategy`]: how the coordinator configures a round and aggregates what
//!   the parties send back (as Flower's `Strategy`, with typed stages).
//! * [`Trainer`]: what a party does with its private data (set parameters,
//!   fit, evaluate, predict).
//! * [`FedAvg`], [`LogisticRegression`] and the [`data`] loaders make a whole
//!   federation runnable without libtorch.

pub mod data;
mod error;
pub mod hard_examples;
pub mod logreg;
pub mod params;
pub mod state;
pub mod strategies;
pub mod strategy;
pub mod trainer;

pub use error::Error;
pub use logreg::LogisticRegression;
pub use params::{Parameters, Tensor, TensorSpec};
pub use state::State;
pub use strategy::{Capabilities, EvalResult, FedAvg, FitInstruction, FitResult, RoundContext, Strategy};
pub use trainer::{
    Architecture, DpSgdPlan, Engine, EvalOutcome, FeatureStats, FitConfig, FitOutcome, Metrics, ModelConfig, ModelKind,
    OptimizerKind, RawModel, TrainConfig, Trainer,
};
