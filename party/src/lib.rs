//! The Confide party node.
//!
//! A party only dials out: it opens one long-lived mutual-TLS stream to the
//! coordinator, receives job offers and round tasks on it, applies its local
//! [`config::Policy`], trains next to its private data on a dedicated thread per
//! job, and sends back parameters, counts and metrics — never rows. After any
//! failure it reconnects with exponential back-off and resumes.

pub mod cli;
pub mod config;
pub mod local;
pub mod node;
#[cfg(feature = "torch")]
pub mod torch;
pub mod trainers;

mod error;
pub use error::Error;
