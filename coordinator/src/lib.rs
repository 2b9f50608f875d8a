//! The Confide coordinator: links parties, runs jobs as sessions of rounds,
//! and persists everything needed to resume after a crash.
//!
//! Layers, from the bottom: [`session`] is the sans-IO session of a job,
//! generic over job kinds; [`jobs`] holds the kinds' state machines
//! (training, evaluation); [`plugins`] the registry of strategies,
//! aggregation protocols and kinds; [`db`] the SQLite persistence;
//! [`driver`] runs each job's session on a thread of its own; [`server`] is
//! the tokio/tonic side with [`tls`] for mutual TLS; [`telemetry`] its
//! Prometheus metrics; [`cli`] the `confide` command.

pub mod cli;
pub mod dashboard;
pub mod db;
pub mod driver;
pub mod jobs;
pub mod pipeline;
pub mod plugins;
pub mod relay;
pub mod server;
pub mod services;
pub mod session;
pub mod telemetry;
pub mod tls;

mod error;
pub use error::Error;
