//! Threshold-RLWE homomorphic aggregation (feature `he`): the low-level layer.
//!
//! Multiparty RLWE after Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux
//! (PETS 2021) with Shamir-shared keys: a collective public key whose secret
//! no party holds ([`keygen`]), encryption of packed b-bit vectors under it
//! and coefficient-wise addition ([`encrypt`]), τ-of-n decryption with
//! flooding noise and a cross-check of surplus shares ([`decrypt`]), and a
//! linear hash that lets decryptors verify what they are asked to decrypt
//! ([`hash`]). Built on TFHE-rs: its CSPRNG and XOF for all randomness and
//! `tfhe-ntt` (the NTT TFHE-rs uses) for products in Z_q\[X\]/(X^N + 1).
//!
//! TFHE-rs is licensed BSD-3-Clause-Clear with Zama's patent terms (free for
//! research and prototyping; commercial use needs Zama's patent licence):
//! see `docs/homomorphic-aggregation.md` before enabling `he` in production.

pub mod decrypt;
pub mod encrypt;
pub mod hash;
pub mod keygen;
pub mod pack;
pub mod params;
pub mod ring;
pub mod sample;

#[cfg(test)]
mod tests;

pub use decrypt::{Decrypted, DecryptionShare, FloodingNoise, combine};
pub use encrypt::{Aggregate, Ciphertext, EncryptionMasks};
pub use hash::LinearHash;
pub use keygen::{CommonPoly, DealerSecret, Dealing, KeyShare, PublicKey, PublicKeyShare, SecretShare, deal};
pub use params::HeParams;
pub use sample::Csprng;
