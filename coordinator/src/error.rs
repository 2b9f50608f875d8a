/// Errors of the coordinator. Each names the job, party, file or field at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad configuration or arguments.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A job, party or model does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The database failed.
    #[error("storage: {0}")]
    Storage(String),
    /// A file could not be read or written.
    #[error("{0}")]
    Io(String),
    /// TLS set-up failed.
    #[error("tls: {0}")]
    Tls(String),
    /// A peer broke the protocol.
    #[error("party {party} misbehaved: {reason}")]
    PeerMisbehaved {
        /// The party at fault.
        party: String,
        /// What it did.
        reason: String,
    },
    /// A submitted job is refused; the message lists every field at fault.
    #[error("{0}")]
    Refused(String),
    /// A job spec is invalid.
    #[error(transparent)]
    Spec(#[from] confide_proto::jobspec::SpecErrors),
    /// PKI failure.
    #[error(transparent)]
    Pki(#[from] confide_crypto::Error),
    /// Model encoding failure.
    #[error(transparent)]
    Model(#[from] confide_algorithms::Error),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, e: std::io::Error) -> Error {
        Error::Io(format!("{}: {e}", path.display()))
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        match e {
            Error::InvalidInput(_) | Error::Spec(_) | Error::Refused(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            Error::NotFound(_) => tonic::Status::not_found(e.to_string()),
            Error::PeerMisbehaved { .. } => tonic::Status::failed_precondition(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
