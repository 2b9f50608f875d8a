use std::path::PathBuf;

/// Errors of the crypto crate. Each names the file, field or peer at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument or a file's content is not acceptable.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Certificate(String),
    /// A peer sent something the protocol forbids; names the peer.
    #[error("party {party} misbehaved: {reason}")]
    PeerMisbehaved {
        /// The party at fault ("coordinator" for the server).
        party: String,
        /// What it did.
        reason: String,
    },
    /// A party's plaintext update failed a check (shape, size, finiteness,
    /// count); the aggregate goes on without it.
    #[error("party {party} sent a bad update: {reason}")]
    BadUpdate {
        /// The party at fault.
        party: String,
        /// What was wrong.
        reason: String,
    },
    /// A peer's certificate that this process accepted earlier is no longer
    /// valid (it expired, or was revoked, since): the peer's standing
    /// changed, which no relay of it caused. A round refuses it; a party
    /// does not blame the coordinator for relaying it (found by review).
    #[error("party {party}'s certificate lapsed: {reason}")]
    CertificateLapsed {
        /// The peer whose certificate lapsed.
        party: String,
        /// Expired or revoked, and when.
        reason: String,
    },
    /// Too few parties or shares remain to finish the protocol.
    #[error("below threshold: {0}")]
    BelowThreshold(String),
    /// A call came at the wrong stage of the protocol.
    #[error("protocol stage: {0}")]
    WrongStage(String),
    /// The item already exists and would be overwritten.
    #[error("{0} already exists; refusing to overwrite it")]
    AlreadyExists(String),
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Certificate(e.to_string())
    }
}
