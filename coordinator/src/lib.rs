//! The Confide coordinator: links parties, runs jobs as sessions of rounds,
//! and persists everything needed to resume after a crash.
//!
//! Layers, from the bottom: [`session`] is the sans-IO round state machine;
//! [`db`] the SQLite persistence; [`server`] the tokio/tonic driver with
//! [`tls`] for mutual TLS; [`cli`] the `confide` command.

pub mod cli;
pub mod db;
pub mod plugins;
pub mod server;
pub mod session;
pub mod tls;

mod error;
pub use error::Error;
