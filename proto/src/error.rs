/// Errors of the wire layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value is not acceptable.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A message or transfer exceeds a configured limit.
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    /// The peer broke the protocol (out-of-order chunk, wrong ids, ...).
    #[error("protocol violation: {0}")]
    ProtocolViolation(String),
    /// The connection could not be made or broke.
    #[error("{0}")]
    Transport(String),
    /// A job spec failed validation; lists every error.
    #[error("{0}")]
    Spec(#[from] crate::jobspec::SpecErrors),
}
