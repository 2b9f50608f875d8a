//! Client-side connection set-up shared by the CLI and the party node.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use confide_crypto::identity::SharedRevocations;
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

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

/// Metadata of a join refused for reconnecting too often: how many
/// milliseconds until the coordinator takes one again.
pub const RETRY_AFTER_MS: &str = "confide-retry-after-ms";

/// The longest wait a refusal's [`RETRY_AFTER_MS`] can impose on a party:
/// the coordinator's budget earns a join every few seconds, so a larger
/// hint is a coordinator fault (or a stall) the party does not honour.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Marks `status` with how long to wait before joining again.
pub fn with_retry_after(mut status: tonic::Status, wait: Duration) -> tonic::Status {
    let ms = wait.as_millis().max(1).to_string();
    if let Ok(value) = ms.parse() {
        status.metadata_mut().insert(RETRY_AFTER_MS, value);
    }
    status
}

/// How long a refused join asks the party to wait, if it says (bounded by
/// [`MAX_RETRY_AFTER`]); `None` for any other refusal or a malformed hint.
pub fn retry_after(status: &tonic::Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let ms: u64 = status.metadata().get(RETRY_AFTER_MS)?.to_str().ok()?.parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_RETRY_AFTER))
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
    Ok(connect_checking_revocations(id, None).await?.0)
}

/// The certificate the coordinator showed at the channel's latest handshake
/// (the channel reconnects by itself), to check against a newer revocation
/// list that arrives while connected.
pub type CoordinatorCertificate = Arc<Mutex<Option<CertificateDer<'static>>>>;

/// Opens a mutually authenticated TLS channel to the coordinator and, when
/// `revocations` is given, refuses a coordinator whose certificate that list
/// revokes (checked at the handshake against the newest list at that time).
///
/// tonic's own TLS settings take no certificate-verifier hook, so the
/// handshake is done here with tokio-rustls and the channel is given the
/// finished TLS stream.
pub async fn connect_checking_revocations(
    id: &ClientIdentity<'_>,
    revocations: Option<SharedRevocations>,
) -> Result<(Channel, CoordinatorCertificate), Error> {
    connect_to(id, revocations, &[]).await
}

/// [`connect_checking_revocations`], refusing at every handshake (the
/// channel reconnects by itself) a server whose certificate has none of
/// `roles` (none given: any of the federation). The administrator's CLI
/// asks for the coordinator: a relay's certificate is also the federation
/// CA's and names `localhost` too.
pub async fn connect_to(
    id: &ClientIdentity<'_>,
    revocations: Option<SharedRevocations>,
    roles: &[confide_crypto::pki::Role],
) -> Result<(Channel, CoordinatorCertificate), Error> {
    let tls = client_config(id, revocations, roles)?;
    let server_name = ServerName::try_from(id.server_name.to_owned())
        .map_err(|e| Error::InvalidInput(format!("server name {:?}: {e}", id.server_name)))?;
    let uri: Uri = id.url.parse().map_err(|e| Error::InvalidInput(format!("coordinator address {:?}: {e}", id.url)))?;
    if uri.scheme_str() != Some("https") {
        return Err(Error::InvalidInput(format!("coordinator address {:?}: must start with https://", id.url)));
    }
    let authority =
        uri.authority().ok_or_else(|| Error::InvalidInput(format!("coordinator address {:?}: no host", id.url)))?;
    let address = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(443));
    // The channel's own URI says http: the TLS is ours, done by the connector.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| Error::InvalidInput(format!("coordinator address {:?}: {e}", id.url)))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        // Room for a whole model in flight: a multi-megabyte transfer is not
        // held up by window updates from a receiver that is busy training.
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_frame_size(HTTP2_MAX_FRAME);
    let seen = CoordinatorCertificate::default();
    let connector =
        TlsConnector { tls: tokio_rustls::TlsConnector::from(Arc::new(tls)), server_name, address, seen: seen.clone() };
    let channel = endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| Error::Transport(format!("cannot connect to {}: {}", id.url, source_chain(&e))))?;
    Ok((channel, seen))
}

/// Reads every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let data = std::fs::read(path).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::InvalidInput(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

/// Reads a private key from a PEM file (refused when others can read it).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let data = confide_crypto::pki::read_private_key(path).map_err(|e| Error::InvalidInput(e.to_string()))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))?
        .ok_or_else(|| Error::InvalidInput(format!("{}: no private key found", path.display())))
}

/// Checks that `id`'s CA, certificate and key load and fit together, so
/// that a party stops at start naming the file, rather than retrying a
/// connection that can never succeed (found by review).
pub fn check_client_identity(id: &ClientIdentity<'_>) -> Result<(), Error> {
    client_config(id, None, &[]).map(drop)
}

/// The client side of mutual TLS: our certificate, the federation CA as the
/// only root, ALPN h2 for gRPC.
fn client_config(
    id: &ClientIdentity<'_>,
    revocations: Option<SharedRevocations>,
    roles: &[confide_crypto::pki::Role],
) -> Result<ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(id.ca)? {
        roots.add(c).map_err(|e| Error::InvalidInput(format!("{}: {e}", id.ca.display())))?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", id.ca.display())))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::InvalidInput(format!("TLS configuration: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CoordinatorVerifier { webpki, revocations, roles: roles.to_vec() }))
        .with_client_auth_cert(load_certs(id.cert)?, load_key(id.key)?)
        .map_err(|e| Error::InvalidInput(format!("{} with key {}: {e}", id.cert.display(), id.key.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // A resumed TLS session skips certificate verification, and with it the
    // revocation check: every handshake verifies the coordinator afresh.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The usual WebPKI checks against the federation CA, then the revocation
/// list the party holds: a coordinator whose certificate the federation's
/// CA revoked cannot hide that by not distributing the list.
#[derive(Debug)]
struct CoordinatorVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    revocations: Option<SharedRevocations>,
    /// The roles the server's certificate may have (empty: any).
    roles: Vec<confide_crypto::pki::Role>,
}

impl ServerCertVerifier for CoordinatorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        if let Some(list) = &self.revocations {
            let list = list.read().unwrap_or_else(|p| p.into_inner());
            if list.check("the coordinator", end_entity).is_err() {
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        if !self.roles.is_empty() {
            match confide_crypto::pki::peer_identity(end_entity) {
                Ok(shown) if self.roles.contains(&shown.role) => {}
                Ok(shown) => {
                    return Err(rustls::Error::General(format!(
                        "the server shows a {:?} certificate ({}), not one of {:?}",
                        shown.role, shown.name, self.roles
                    )));
                }
                Err(e) => return Err(rustls::Error::General(format!("the server's certificate: {e}"))),
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Connects TCP and runs the client TLS handshake for the channel.
#[derive(Clone)]
struct TlsConnector {
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    address: String,
    seen: CoordinatorCertificate,
}

impl tower_service::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.address).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await?;
            let certificate =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
            *this.seen.lock().unwrap_or_else(|p| p.into_inner()) = certificate;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Whether an HTTP request's `Host` header names a local web server (the
/// dashboard, a party's prediction endpoint): `localhost`, an IP literal or
/// one of `names`, with any port or none. A page served from another site
/// that rebinds its own name to the server's address (DNS rebinding) sends
/// that name, which is refused; the name is what tells, not the port (a
/// proxy or a mapped port may show another).
pub fn http_host_allowed(host: &str, names: &[String]) -> bool {
    let port_ok = |p: &str| p.parse::<u16>().is_ok();
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal, with or without a port.
        return match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.strip_prefix(':').is_some_and(port_ok) => {
                ip.parse::<std::net::Ipv6Addr>().is_ok()
            }
            _ => false,
        };
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => host,
    };
    // A fully qualified name may end in a dot.
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && (name.eq_ignore_ascii_case("localhost")
            || name.parse::<std::net::Ipv4Addr>().is_ok()
            || names.iter().any(|a| a.eq_ignore_ascii_case(name)))
}

/// Checks names given for [`http_host_allowed`] (`serve.allow_hosts`,
/// `metrics.allow_hosts`, the dashboard's `--allow-host`): host names,
/// without a port or a trailing dot (which would never match).
pub fn check_host_names(field: &str, names: &[String]) -> Result<(), String> {
    for (i, h) in names.iter().enumerate() {
        let name_like = !h.is_empty()
            && h.len() <= 253
            && !h.ends_with('.')
            && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !name_like {
            return Err(format!(
                "{field}[{i}]: {h:?} is not a host name (letters, digits, '-' and '.'; no port, no trailing dot)"
            ));
        }
    }
    Ok(())
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

/// Takes a revocation list from the wire (DER or PEM, from `source`) in
/// place of the one `held`, when `ca_pem` signed it and it is newer, and
/// keeps it at `keep_at` (crash-safely) for the next start: its version
/// then. `None` when it is the one held; an error when the CA did not sign
/// it, it is older, or it cannot be kept.
pub fn adopt_revocations(
    held: &SharedRevocations,
    bytes: &[u8],
    ca_pem: &[u8],
    source: &str,
    keep_at: &Path,
) -> Result<Option<u64>, String> {
    // Every welcome carries the list: the one held is not checked again.
    if bytes.is_empty() || held.read().unwrap_or_else(|p| p.into_inner()).der() == bytes {
        return Ok(None);
    }
    let list = confide_crypto::revocation::Revocations::parse(bytes, ca_pem, source).map_err(|e| e.to_string())?;
    let (version, pem) = (list.version(), list.pem());
    let newer = held.write().unwrap_or_else(|p| p.into_inner()).update(list).map_err(|e| format!("{source}: {e}"))?;
    if !newer {
        return Ok(None);
    }
    crate::durable::write_file(keep_at, pem.as_bytes())?;
    Ok(Some(version))
}
