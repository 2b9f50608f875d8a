//! Mutual TLS 1.3 for the coordinator (server side) and the CLI (client side).
//!
//! The coordinator runs its own accept loop instead of tonic's built-in TLS so
//! that every refused peer is logged with the reason: no certificate, another
//! CA, expired, revoked, unknown role, or a party name not enrolled.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use confide_crypto::identity::SharedRevocations;
use confide_crypto::pki::{self, PkiDir, Role};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{info, warn};

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Error;

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    confide_proto::net::load_certs(path).map_err(|e| Error::Tls(e.to_string()))
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    confide_proto::net::load_key(path).map_err(|e| Error::Tls(e.to_string()))
}

/// The server configuration: TLS 1.3 only, client certificates required and
/// verified against the federation CA, ALPN h2 for gRPC.
pub fn server_config(pki: &PkiDir) -> Result<rustls::ServerConfig, Error> {
    server_config_with(&pki.ca_cert(), &pki.coordinator_cert(), &pki.coordinator_key())
}

/// [`server_config`] for any server certificate of the federation (a relay's).
pub fn server_config_with(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| Error::Tls(format!("{}: {e}", ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| Error::Tls(format!("{}: {e}", cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Who a server admits after the TLS handshake.
#[derive(Clone)]
pub enum Admission {
    /// The coordinator: enrolled parties, relays and the admin, none revoked.
    Coordinator {
        /// The federation directory (its enrollment list).
        pki: PkiDir,
        /// The revocation list in force.
        revocations: SharedRevocations,
    },
    /// A relay: party certificates of the federation (the coordinator checks
    /// enrollment and revocation when the relay opens the party's stream).
    Relay,
}

/// Accepts TCP connections and completes the TLS handshake on each, then
/// checks the client certificate against `admission`'s rules. Refused
/// connections are logged with their reason, and counted by reason class in
/// `refusals` when given.
pub fn accept_loop(
    listener: TcpListener,
    config: rustls::ServerConfig,
    admission: Admission,
    refusals: Option<prometheus::IntCounterVec>,
) -> mpsc::Receiver<Result<Conn, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx, admission, refusals) =
                (acceptor.clone(), tx.clone(), admission.clone(), refusals.clone());
            tokio::spawn(async move {
                match handshake(acceptor, tcp, addr, &admission).await {
                    Ok(stream) => {
                        let _ = tx.send(Ok(Conn::new(stream))).await;
                    }
                    Err(refusal) => {
                        if let Some(r) = refusals {
                            r.with_label_values(&[refusal.as_str()]).inc();
                        }
                    }
                }
            });
        }
    });
    rx
}

/// Why a connection was refused, as a bounded metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The handshake did not finish in time.
    Timeout,
    /// The client presented no certificate.
    NoCertificate,
    /// The certificate is not the federation CA's.
    UnknownIssuer,
    /// The certificate has expired or is not valid yet.
    Expired,
    /// The certificate is on the revocation list.
    Revoked,
    /// A certificate of the wrong role here (a coordinator's as a client, a
    /// relay's or admin's at a relay), or one without a Confide identity.
    WrongRole,
    /// A party certificate not in the enrollment list (or the list unreadable).
    NotEnrolled,
    /// Any other handshake failure (protocol version, a bad signature...).
    HandshakeFailed,
}

impl Refusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Timeout => "timeout",
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownIssuer => "unknown_issuer",
            Refusal::Expired => "expired",
            Refusal::Revoked => "revoked",
            Refusal::WrongRole => "wrong_role",
            Refusal::NotEnrolled => "not_enrolled",
            Refusal::HandshakeFailed => "handshake_failed",
        }
    }

    /// The class of a failed handshake, from rustls's error when it has one.
    fn of_handshake(e: &std::io::Error) -> Refusal {
        use rustls::{CertificateError, Error as TlsError};
        match e.get_ref().and_then(|inner| inner.downcast_ref::<TlsError>()) {
            Some(TlsError::NoCertificatesPresented) => Refusal::NoCertificate,
            Some(TlsError::InvalidCertificate(c)) => match c {
                CertificateError::UnknownIssuer => Refusal::UnknownIssuer,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Refusal::Expired,
                CertificateError::Revoked => Refusal::Revoked,
                _ => Refusal::HandshakeFailed,
            },
            _ => Refusal::HandshakeFailed,
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    admission: &Admission,
) -> Result<TlsStream<TcpStream>, Refusal> {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Err(_) => {
            warn!(peer = %addr, "refused connection: TLS handshake timed out");
            return Err(Refusal::Timeout);
        }
        Ok(Err(e)) => {
            warn!(peer = %addr, "refused connection: TLS handshake failed: {e}");
            return Err(Refusal::of_handshake(&e));
        }
        Ok(Ok(s)) => s,
    };
    let Some(cert) = stream.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
        warn!(peer = %addr, "refused connection: no client certificate");
        return Err(Refusal::NoCertificate);
    };
    let id = match pki::peer_identity(cert) {
        Ok(id) => id,
        Err(e) => {
            warn!(peer = %addr, "refused connection: {e}");
            return Err(Refusal::WrongRole);
        }
    };
    let (pki, revocations) = match admission {
        Admission::Coordinator { pki, revocations } => (pki, revocations),
        Admission::Relay if id.role == Role::Party => {
            info!(peer = %addr, party = %id.name, "authenticated party");
            return Ok(stream);
        }
        Admission::Relay => {
            warn!(peer = %addr, name = %id.name, "refused connection: a relay serves party certificates only");
            return Err(Refusal::WrongRole);
        }
    };
    let revoked = revocations.read().unwrap_or_else(|p| p.into_inner()).check(&id.name, cert);
    if revoked.is_err() {
        warn!(peer = %addr, name = %id.name, "refused connection: the certificate of {} is revoked", id.name);
        return Err(Refusal::Revoked);
    }
    match id.role {
        // A relay speaks for a party only with that party's delegation,
        // checked (with the enrollment list) when it opens the party's stream.
        Role::Admin | Role::Relay => {}
        Role::Coordinator => {
            warn!(peer = %addr, name = %id.name, "refused connection: a coordinator certificate cannot be used as a client");
            return Err(Refusal::WrongRole);
        }
        Role::Party => match pki.enrolled() {
            Ok(list) if list.contains(&id.name) => {}
            Ok(_) => {
                warn!(peer = %addr, party = %id.name, "refused connection: party {} is not enrolled in this federation", id.name);
                return Err(Refusal::NotEnrolled);
            }
            Err(e) => {
                warn!(peer = %addr, party = %id.name, "refused connection: cannot read the enrollment list: {e}");
                return Err(Refusal::NotEnrolled);
            }
        },
    }
    info!(peer = %addr, name = %id.name, role = ?id.role, "authenticated connection");
    Ok(stream)
}

/// An accepted connection: its TLS stream, which the coordinator can cut.
///
/// A server cannot end one HTTP/2 stream whose client stops reading: once
/// the stream's flow-control window is full, hyper stops polling the
/// response, so a status queued in it is never sent. Cutting the connection
/// ([`Cut::cut`]) makes its reads and writes fail, and hyper drops it with
/// every stream on it.
pub struct Conn {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
}

/// What the service sees of a [`Conn`] (tonic puts it in each request's
/// extensions): the client's certificates and the cut.
#[derive(Clone)]
pub struct ConnInfo {
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Cuts this connection.
    pub cut: Cut,
}

/// Cuts one connection (every clone the same one).
#[derive(Clone, Default)]
pub struct Cut(Arc<CutState>);

#[derive(Default)]
struct CutState {
    cut: AtomicBool,
    waker: AtomicWaker,
}

impl Cut {
    /// Makes the connection's reads and writes fail from now on, waking it.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::SeqCst);
        self.0.waker.wake();
    }

    /// Whether this is `other`'s connection.
    pub fn same(&self, other: &Cut) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether it was cut.
    pub fn is_cut(&self) -> bool {
        self.0.cut.load(Ordering::SeqCst)
    }

    /// An error if cut; otherwise registers the connection's task to be
    /// woken by a cut.
    fn check(&self, cx: &Context<'_>) -> std::io::Result<()> {
        self.0.waker.register(cx.waker());
        if self.0.cut.load(Ordering::SeqCst) {
            return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "cut by the coordinator"));
        }
        Ok(())
    }
}

impl Conn {
    fn new(stream: TlsStream<TcpStream>) -> Self {
        let certs = stream.get_ref().1.peer_certificates().map(|c| Arc::new(c.to_vec()));
        Conn { stream, info: ConnInfo { certs, cut: Cut::default() } }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.info.cut.check(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.info.cut.check(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.info.cut.check(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.info.cut.check(cx)?;
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // A cut connection is done with: no close_notify to wait for.
        if self.info.cut.check(cx).is_err() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connection a request came on (accepted by [`accept_loop`]).
pub fn connection_of<T>(req: &tonic::Request<T>) -> Result<&ConnInfo, tonic::Status> {
    req.extensions().get::<ConnInfo>().ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))
}

/// The certificate (DER) the peer of a request presented (already verified
/// by [`accept_loop`]).
pub fn peer_certificate<T>(req: &tonic::Request<T>) -> Result<Arc<[u8]>, tonic::Status> {
    connection_of(req)?
        .certs
        .as_ref()
        .and_then(|c| c.first().map(|c| Arc::from(c.as_ref())))
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))
}

/// The identity of the peer of a request (already verified by [`accept_loop`]).
pub fn peer_of<T>(req: &tonic::Request<T>) -> Result<pki::PeerIdentity, tonic::Status> {
    let info = connection_of(req)?;
    let cert = info
        .certs
        .as_ref()
        .and_then(|c| c.first())
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
    pki::peer_identity(cert).map_err(|e| tonic::Status::unauthenticated(e.to_string()))
}
