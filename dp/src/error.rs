/// Errors of the differential-privacy crate; each names the parameter at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A parameter is out of its range.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The operating system refused what the computation needs (its random
    /// number generator, a thread).
    #[error("system: {0}")]
    System(String),
    /// No parameter in the searched range reaches the target.
    #[error("unreachable target: {0}")]
    Unreachable(String),
}
