//! The Confide party node.
//!
//! A party only dials out: it opens one long-lived mutual-TLS stream to the
//! coordinator, receives job offers and round tasks on it, applies its local
//! [`config::Policy`] ([`policy`]), trains next to its private data on a
//! dedicated thread per job, and sends back what the job's aggregation
//! protocol lets it send — never rows. After any failure it reconnects with
//! exponential back-off and resumes.
//!
//! Layers: [`session`] is the sans-IO session of one job (tested on a
//! virtual clock); [`training`] the built-in kinds' task handler;
//! [`ledger`] the privacy budget each data set has spent;
//! [`plugins`] the registry of trainers, protocols and kinds; [`node`] the
//! driver (connection loop, one thread per job); [`cli`] the program.

pub mod audit;
pub mod cli;
pub mod config;
pub mod ledger;
pub mod local;
pub mod node;
pub mod plugins;
pub mod policy;
pub mod serving;
pub mod session;
pub mod telemetry;
#[cfg(feature = "torch")]
pub mod torch;
pub mod trainers;
pub mod training;
pub mod watch;

mod error;
pub use error::Error;
