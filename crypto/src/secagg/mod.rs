//! SecAgg+ secure aggregation (Bell et al., CCS 2020, building on Bonawitz et
//! al., CCS 2017) as sans-IO client and server state machines.
//!
//! The coordinator learns the sum of the surviving parties' inputs and
//! nothing else, even when parties drop out at any stage, as long as at least
//! `threshold` neighbours of every party answer the unmasking stage.
//!
//! Layers: [`shamir`] (secret sharing over GF(2^61 − 1)), [`prim`] (HKDF key
//! derivation, AES-CTR mask PRG, AES-256-GCM share encryption), [`graph`]
//! (the k-regular neighbour graph), [`encoding`] (fixed point in Z_{2^b}),
//! [`packing`] (masked inputs at b bits on the wire) and [`protocol`] (the
//! five-stage client and server).

pub mod encoding;
pub mod graph;
pub mod packing;
pub mod params;
pub mod prim;
pub mod protocol;
pub mod shamir;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
