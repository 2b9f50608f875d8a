//! Client-side connection set-up shared by the CLI and the party node.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// Where and how to reach the coordinator with a client certificate.
#[derive(Debug, Clone)]
pub struct ClientIdentity<'a> {
    /// `https://host:port`.
    pub url: &'a str,
    /// The name in the coordinator's certificate to verify.
    pub server_name: &'a str,
    /// Federation CA certificate.
    pub ca: &'a Path,
    /// Our certificate.
    pub cert: &'a Path,
    /// Our private key.
    pub key: &'a Path,
}

/// HTTP/2 flow-control window per stream: large enough for a chunked
/// multi-megabyte model to flow without waiting for window updates.
pub const HTTP2_STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 flow-control window per connection.
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame accepted: a 1 MiB chunk travels in a few frames
/// instead of 64.
pub const HTTP2_MAX_FRAME: u32 = 1 << 20;

/// Opens a mutually authenticated TLS channel to the coordinator.
pub async fn connect(id: &ClientIdentity<'_>) -> Result<Channel, Error> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| Error::InvalidInput(format!("{}: {e}", p.display())));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(id.ca)?))
        .identity(Identity::from_pem(
            read(id.cert)?,
            confide_crypto::pki::read_private_key(id.key).map_err(|e| Error::InvalidInput(e.to_string()))?.as_slice(),
        ))
        .domain_name(id.server_name);
    let endpoint = Endpoint::from_shared(id.url.to_owned())
        .map_err(|e| Error::InvalidInput(format!("coordinator address {:?}: {e}", id.url)))?
        .tls_config(tls)
        .map_err(|e| Error::InvalidInput(format!("TLS configuration: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // Room for a whole model in flight: a multi-megabyte transfer is not
        // held up by window updates from a receiver that is busy training.
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME);
    endpoint
        .connect()
        .await
        .map_err(|e| Error::Transport(format!("cannot connect to {}: {}", id.url, source_chain(&e))))
}

/// Formats an error with its sources, which is where tonic puts the useful part.
pub fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
