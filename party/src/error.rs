/// Errors of the party node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; names the file and field.
    #[error("config: {0}")]
    Config(String),
    /// The coordinator broke the protocol.
    #[error("coordinator misbehaved: {0}")]
    PeerMisbehaved(String),
    /// The connection failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The coordinator refused the stream for reconnecting too often,
    /// saying how long to wait (bounded by `confide_proto::net::MAX_RETRY_AFTER`).
    #[error("transport: {0}")]
    Throttled(String, std::time::Duration),
    /// Local training failed.
    #[error("training: {0}")]
    Training(String),
}
