//! Cryptography of the Confide federation.
//!
//! This crate knows nothing of networking. Today it holds the federation's PKI
//! ([`pki`]): the CA, the role-tagged certificates of the coordinator, the admin
//! and each party, and the enrollment list the coordinator checks peers against.
//! Secure aggregation and homomorphic encryption land here as further modules.

pub mod identity;
pub mod pki;
pub mod secagg;

mod error;
pub use error::Error;
