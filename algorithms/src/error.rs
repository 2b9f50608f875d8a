use std::path::PathBuf;

/// Errors of the algorithms crate. Each names the party, tensor, file or
/// field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument is not acceptable.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A party's update failed a check (shape, size, finiteness, count).
    #[error("party {party} sent a bad update: {reason}")]
    PeerMisbehaved {
        /// The party at fault.
        party: String,
        /// What was wrong.
        reason: String,
    },
    /// There was nothing to aggregate (no results, or zero examples in all).
    #[error("nothing to aggregate: {0}")]
    EmptyAggregation(String),
    /// A data file is unreadable or malformed.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The file at fault.
        path: PathBuf,
        /// 1-based line number (0 when the whole file is at fault).
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// Local training failed (numerics, or the training library).
    #[error("training: {0}")]
    Training(String),
    /// A model file (safetensors) is malformed.
    #[error("model file: {0}")]
    ModelFile(String),
}
