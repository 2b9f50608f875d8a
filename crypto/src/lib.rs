//! Cryptography of the Confide federation.
//!
//! This crate knows nothing of networking. Layers, as in tfhe-rs:
//!
//! * low level: the federation's PKI ([`pki`]), its revocation list
//!   ([`revocation`]) and certificate-bound signatures ([`identity`]); SecAgg+'s primitives and sans-IO state
//!   machines ([`secagg`]);
//! * protocol layer: [`aggregation`], every way the parties' updates are
//!   combined (plaintext, SecAgg+; threshold HE in [`he`], its protocol next) behind one pair of
//!   traits that the coordinator's and the party's sessions drive.

pub mod aggregation;
pub mod dleq;
#[cfg(feature = "he")]
pub mod he;
pub mod identity;
pub mod pki;
pub mod relay;
pub mod revocation;
pub mod sealed;
pub mod secagg;

mod error;
pub use error::Error;
