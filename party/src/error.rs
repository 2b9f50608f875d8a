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
    /// Local training failed.
    #[error("training: {0}")]
    Training(String),
}
