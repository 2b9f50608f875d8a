//! The federation's public-key infrastructure.
//!
//! One CA per federation signs every certificate. A certificate carries its
//! holder's name in the subject CN and its role (party, admin, coordinator) in
//! the subject OU, so the coordinator can tell a party from the admin CLI
//! without a second trust root. Enrollment is a separate list
//! (`federation.toml`): a certificate signed by the CA is necessary but not
//! sufficient for a party to join.
//!
//! In production a party makes its own key and a certificate signing
//! request ([`write_key_request`], `confide-party keygen`), and whoever keeps
//! the CA key signs the request ([`PkiDir::sign_party_request`], `confide
//! certs sign`): the key never leaves the party, and the coordinator's host
//! needs no CA key. [`PkiDir::init`] can also make every key in one place,
//! for demos and tests.
//!
//! Directory layout written by [`PkiDir::init`]:
//! ```text
//! DIR/ca.pem  ca.key            federation CA (key 0600)
//! DIR/coordinator.pem .key      coordinator's server certificate
//! DIR/admin.pem admin.key       admin client certificate used by the CLI
//! DIR/parties/NAME.pem .key     one client certificate per party
//! DIR/federation.toml           enrolled party names
//! DIR/revoked.crl.pem           revoked certificates (after `confide certs revoke`)
//! DIR/issued-admins.log         serials of the administrator certificates issued
//! DIR/.lock                     held while a command changes the directory
//! ```
//!
//! Every method that changes the directory holds [`PkiDir`]'s lock
//! (`flock` on `DIR/.lock`) from its first read to its last write, so two
//! `confide certs` commands run at once cannot both read version N of the
//! revocation list (or the enrollment list) and each write their own N + 1,
//! losing the other's entry.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

use crate::Error;

/// The subject CN of the admin client certificate.
pub const ADMIN_NAME: &str = "confide-admin";
/// The subject CN of the coordinator's server certificate.
pub const COORDINATOR_NAME: &str = "confide-coordinator";
/// Longest accepted party name.
pub const MAX_PARTY_NAME_LEN: usize = 63;

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A party node: may open the party stream.
    Party,
    /// The administrator's CLI: may use the admin API.
    Admin,
    /// The coordinator's server certificate.
    Coordinator,
    /// An intermediate aggregator (`confide relay`): a server to the parties
    /// that dial it and a client of the coordinator. It speaks for a party
    /// only with that party's signed delegation.
    Relay,
}

impl Role {
    fn as_ou(self) -> &'static str {
        match self {
            Role::Party => "confide-party",
            Role::Admin => "confide-admin",
            Role::Coordinator => "confide-coordinator",
            Role::Relay => "confide-relay",
        }
    }

    fn from_ou(ou: &str) -> Option<Role> {
        match ou {
            "confide-party" => Some(Role::Party),
            "confide-admin" => Some(Role::Admin),
            "confide-coordinator" => Some(Role::Coordinator),
            "confide-relay" => Some(Role::Relay),
            _ => None,
        }
    }
}

/// Who a verified peer certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject CN: the party's name.
    pub name: String,
    /// The role from the subject OU.
    pub role: Role,
}

/// A certificate and its private key in PEM. The key is zeroized on drop.
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: Zeroizing<String>,
}

/// Checks a party name: lowercase letters, digits, `-`, `_`, `.`, starting
/// with a letter or digit, at most [`MAX_PARTY_NAME_LEN`] bytes, and not one of
/// the reserved role names.
pub fn validate_party_name(name: &str) -> Result<(), Error> {
    let ok_chars =
        name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    let ok_first = name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() || name.len() > MAX_PARTY_NAME_LEN || !ok_chars || !ok_first {
        return Err(Error::InvalidInput(format!(
            "party name {name:?}: use 1 to {MAX_PARTY_NAME_LEN} lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
        )));
    }
    // "coordinator" is how protocol errors name the coordinator as the one
    // at fault: a party by that name could pass its own misbehaviour off as
    // the coordinator's and make honest parties leave a job.
    if name == ADMIN_NAME || name == COORDINATOR_NAME || name == "coordinator" {
        return Err(Error::InvalidInput(format!("party name {name:?} is reserved")));
    }
    Ok(())
}

/// The federation CA: signs every certificate of the federation.
pub struct FederationCa {
    cert_pem: String,
    key: KeyPair,
}

impl FederationCa {
    /// Makes a new CA valid for ten years.
    pub fn generate(federation: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Confide federation CA ({federation})"));
        dn.push(DnType::OrganizationName, "Confide");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(FederationCa { cert_pem: cert.pem(), key })
    }

    /// Loads a CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        // Parse once now so that a mismatched or corrupt certificate fails here.
        Issuer::from_ca_cert_pem(cert_pem, &key)?;
        Ok(FederationCa { cert_pem: cert_pem.to_owned(), key })
    }

    /// The CA as the issuer of what it signs.
    pub(crate) fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, Error> {
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.key.serialize_pem())
    }

    /// Issues a certificate for `name` in `role`, valid from `not_before` to
    /// `not_after`. `hosts` become subject alternative names (DNS names or IP
    /// addresses); clients get their name as a DNS SAN as well.
    pub fn issue_with_validity(
        &self,
        role: Role,
        name: &str,
        hosts: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, Error> {
        let mut params = leaf_params(role, name, hosts)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// Signs a certificate signing request made where its key lives
    /// ([`party_key_request`]), for two years. The request must be signed by
    /// its own key (proof of possession); the certificate names the party the
    /// request's subject CN names and carries `role`, whatever else the
    /// request asks for. Returns the name and the certificate (PEM).
    pub fn sign_request(&self, csr_pem: &str, role: Role) -> Result<(String, String), Error> {
        if role != Role::Party {
            return Err(Error::InvalidInput("only party certificates are signed from requests".into()));
        }
        // One decoding for every check and the signature: two PEM parsers
        // could each read another block of one file (found by review).
        let der = request_der(csr_pem)?;
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der.as_slice().into())
            .map_err(|e| Error::InvalidInput(format!("certificate signing request: {e}")))?;
        // The subject as the request's bytes have it: rcgen keeps only the
        // last of several CNs, so `CN=hospital-c, CN=hospital-b` would be
        // signed as hospital-b while tools show hospital-c (found by
        // review). Exactly one CN, and only the attributes a party's own
        // request carries.
        let name = request_der_name(&der)?;
        validate_party_name(&name)?;
        if csr.public_key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
            return Err(Error::InvalidInput(
                "certificate signing request: the key is not ECDSA P-256 (make it with `confide-party keygen`)".into(),
            ));
        }
        let mut params = leaf_params(role, &name, &[])?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(730);
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let cert = params.signed_by(&csr.public_key, &issuer)?;
        Ok((name, cert.pem()))
    }

    /// Issues a certificate valid for two years from now.
    pub fn issue(&self, role: Role, name: &str, hosts: &[String]) -> Result<IssuedCert, Error> {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(role, name, hosts, now - Duration::hours(1), now + Duration::days(730))
    }
}

/// A leaf certificate's parameters: name (CN), role (OU), SANs, usages.
fn leaf_params(role: Role, name: &str, hosts: &[String]) -> Result<CertificateParams, Error> {
    let mut sans: Vec<String> = hosts.to_vec();
    if role != Role::Coordinator {
        sans.push(name.to_owned());
    }
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_ou());
    dn.push(DnType::OrganizationName, "Confide");
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Role::Party | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Role::Relay => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A party's key and certificate signing request, made on the party's own
/// machine so that its private key never leaves it.
pub struct KeyRequest {
    /// The private key, PEM (PKCS#8); write it with mode 0600.
    pub key_pem: Zeroizing<String>,
    /// The request to send to whoever holds the federation CA, PEM.
    pub csr_pem: String,
}

/// A new key for party `name` and its certificate signing request.
pub fn party_key_request(name: &str) -> Result<KeyRequest, Error> {
    validate_party_name(name)?;
    // The request carries the name (and role, for the reader); the CA decides
    // the certificate's usages and validity itself.
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, Role::Party.as_ou());
    dn.push(DnType::OrganizationName, "Confide");
    params.distinguished_name = dn;
    let key = KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    let csr_pem = csr.pem()?;
    Ok(KeyRequest { key_pem: Zeroizing::new(key.serialize_pem()), csr_pem })
}

/// The DER of a PEM certificate signing request holding exactly one
/// `CERTIFICATE REQUEST` block and nothing but whitespace around it: a
/// file with a second block (or a first one hidden from a line-based
/// parser) is refused, so that every check reads what is signed.
fn request_der(csr_pem: &str) -> Result<Vec<u8>, Error> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE REQUEST-----";
    const END: &str = "-----END CERTIFICATE REQUEST-----";
    let bad = |m: &str| Error::InvalidInput(format!("certificate signing request: {m}"));
    let text = csr_pem.trim();
    if !text.starts_with(BEGIN) || !text.ends_with(END) || text.matches("-----BEGIN").count() != 1 {
        return Err(bad("the file must hold exactly one CERTIFICATE REQUEST block and nothing else"));
    }
    let block = pem::parse(text).map_err(|e| bad(&format!("not PEM: {e}")))?;
    if block.tag() != "CERTIFICATE REQUEST" {
        return Err(bad("not a CERTIFICATE REQUEST block"));
    }
    Ok(block.into_contents())
}

/// The one subject CN of a PEM certificate signing request (the party
/// name), refusing a subject with several CNs, or with attributes other
/// than the CN, OU and O that [`party_key_request`] writes.
pub fn request_name(csr_pem: &str) -> Result<String, Error> {
    request_der_name(&request_der(csr_pem)?)
}

/// [`request_name`] of the request's DER.
fn request_der_name(der: &[u8]) -> Result<String, Error> {
    use x509_parser::prelude::FromDer as _;
    let bad = |m: String| Error::InvalidInput(format!("certificate signing request: {m}"));
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(der).map_err(|e| bad(e.to_string()))?;
    let subject = &req.certification_request_info.subject;
    let allowed = [
        x509_parser::oid_registry::OID_X509_COMMON_NAME,
        x509_parser::oid_registry::OID_X509_ORGANIZATIONAL_UNIT,
        x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME,
    ];
    if let Some(other) = subject.iter_attributes().find(|a| !allowed.contains(a.attr_type())) {
        return Err(bad(format!("the subject has an attribute other than CN, OU and O ({})", other.attr_type())));
    }
    let names: Vec<_> = subject.iter_common_name().collect();
    match names.as_slice() {
        [one] => one.as_str().map(str::to_owned).map_err(|e| bad(format!("subject CN: {e}"))),
        [] => Err(bad("no subject CN (the party name)".into())),
        _ => Err(bad(format!("{} subject CNs; a party's request names it once", names.len()))),
    }
}

/// The SHA-256 of a certificate signing request's public key (its
/// SubjectPublicKeyInfo), in hex: printed by `confide-party keygen` and by
/// `confide certs sign`, so that the administrator can check, out of band,
/// that the request signed is the one the hospital made.
pub fn request_key_fingerprint(csr_pem: &str) -> Result<String, Error> {
    use sha2::Digest as _;
    use x509_parser::prelude::FromDer as _;
    let der = request_der(csr_pem)?;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|e| Error::InvalidInput(format!("certificate signing request: {e}")))?;
    let spki = req.certification_request_info.subject_pki.raw;
    Ok(sha2::Sha256::digest(spki).iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes party `name`'s new key and request into `dir` (`NAME.key`, mode
/// 0600, and `NAME.csr`), refusing to overwrite either. Returns both paths.
pub fn write_key_request(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), Error> {
    let req = party_key_request(name)?;
    create_dir(dir)?;
    let (key, csr) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.csr")));
    for p in [&key, &csr] {
        if p.exists() {
            return Err(Error::AlreadyExists(p.display().to_string()));
        }
    }
    write_file(&key, req.key_pem.as_bytes(), 0o600)?;
    write_file(&csr, req.csr_pem.as_bytes(), 0o644)?;
    Ok((key, csr))
}

/// Reads the holder's name and role out of a DER certificate that TLS has
/// already verified against the federation CA.
pub fn peer_identity(cert_der: &[u8]) -> Result<PeerIdentity, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| Error::Certificate(format!("unparsable peer certificate: {e}")))?;
    let subject = cert.subject();
    let single = |attrs: Vec<&x509_parser::x509::AttributeTypeAndValue<'_>>, what: &str| match attrs.as_slice() {
        [one] => {
            one.as_str().map(str::to_owned).map_err(|e| Error::Certificate(format!("peer certificate {what}: {e}")))
        }
        _ => Err(Error::Certificate(format!("peer certificate must have exactly one {what}"))),
    };
    let name = single(subject.iter_common_name().collect(), "subject CN")?;
    let ou = single(subject.iter_organizational_unit().collect(), "subject OU")?;
    let role =
        Role::from_ou(&ou).ok_or_else(|| Error::Certificate(format!("peer certificate has unknown role OU {ou:?}")))?;
    Ok(PeerIdentity { name, role })
}

/// When a certificate (DER or PEM) expires, in Unix seconds (shown to
/// administrators, so that a party's certificate is renewed in time, and
/// checked on each admin request).
pub fn not_after(cert: &[u8]) -> Result<u64, Error> {
    let der = pem_or_der(cert, "certificate")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::Certificate(format!("unparsable certificate: {e}")))?;
    Ok(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0))
}

/// The DER of a PEM block (any label) or of DER bytes as they are; `what`
/// names the input in errors.
pub(crate) fn pem_or_der(bytes: &[u8], what: &str) -> Result<Vec<u8>, Error> {
    if bytes.starts_with(b"-----") {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(bytes).map_err(|e| Error::Certificate(format!("{what}: not PEM: {e}")))?;
        Ok(pem.contents)
    } else {
        Ok(bytes.to_vec())
    }
}

/// The PKI directory of a federation (see the module docs for its layout).
#[derive(Debug, Clone)]
pub struct PkiDir {
    root: PathBuf,
}

impl PkiDir {
    /// Wraps an existing or future PKI directory.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        PkiDir { root: root.into() }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Waits for and takes the directory's lock, held until the guard is
    /// dropped (or the process ends: an `flock` leaves no stale lock).
    /// Taken by each public method that writes, never by the private
    /// helpers they share, since a second lock of the same file from this
    /// process would wait for ever.
    fn lock(&self) -> Result<fs::File, Error> {
        let path = self.root.join(".lock");
        let io = |source| Error::Io { path: path.clone(), source };
        let file =
            fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(&path).map_err(io)?;
        file.lock().map_err(io)?;
        Ok(file)
    }
    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }
    /// The CA key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    /// The coordinator's certificate.
    pub fn coordinator_cert(&self) -> PathBuf {
        self.root.join("coordinator.pem")
    }
    /// The coordinator's key.
    pub fn coordinator_key(&self) -> PathBuf {
        self.root.join("coordinator.key")
    }
    /// The admin CLI's certificate.
    pub fn admin_cert(&self) -> PathBuf {
        self.root.join("admin.pem")
    }
    /// The admin CLI's key.
    pub fn admin_key(&self) -> PathBuf {
        self.root.join("admin.key")
    }
    /// The serials (hex, a line each) of every administrator certificate
    /// issued here: `certs issue --admin` issues another only once all are
    /// revoked. (Not named `admin.*`, so that copying or restoring the
    /// administrator's files leaves it.)
    pub fn admin_issued(&self) -> PathBuf {
        self.root.join("issued-admins.log")
    }

    /// The serials in [`PkiDir::admin_issued`] (none in a directory made
    /// before it was kept).
    fn issued_admins(&self) -> Result<Vec<String>, Error> {
        read_serials(&self.admin_issued())
    }

    /// The serials of every coordinator certificate issued here, one per
    /// line (kept since `certs issue --coordinator` exists).
    pub fn coordinator_issued(&self) -> PathBuf {
        self.root.join("issued-coordinators.log")
    }

    /// Adds `cert_pem`'s serial to [`PkiDir::admin_issued`].
    fn record_admin(&self, cert_pem: &str) -> Result<(), Error> {
        let mut serials = self.issued_admins()?;
        serials.push(hex(&crate::revocation::certificate_serial(cert_pem.as_bytes())?));
        write_file(&self.admin_issued(), format!("{}\n", serials.join("\n")).as_bytes(), 0o644)
    }
    /// A party's certificate.
    pub fn party_cert(&self, name: &str) -> PathBuf {
        self.root.join("parties").join(format!("{name}.pem"))
    }
    /// A party's key.
    pub fn party_key(&self, name: &str) -> PathBuf {
        self.root.join("parties").join(format!("{name}.key"))
    }
    /// The enrollment list.
    pub fn federation_file(&self) -> PathBuf {
        self.root.join("federation.toml")
    }
    /// The revocation list (absent until the first revocation).
    pub fn revocation_file(&self) -> PathBuf {
        self.root.join(crate::revocation::CRL_FILE)
    }

    /// The directory's revocation list, verified against its CA; the empty
    /// list when there is none.
    pub fn revocations(&self) -> Result<crate::revocation::Revocations, Error> {
        let path = self.revocation_file();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(crate::revocation::Revocations::empty());
            }
            Err(source) => return Err(Error::Io { path, source }),
        };
        let ca = fs::read(self.ca_cert()).map_err(|source| Error::Io { path: self.ca_cert(), source })?;
        crate::revocation::Revocations::parse(&bytes, &ca, &path.display().to_string())
    }

    /// Revokes party `name`'s certificate (`parties/NAME.pem` here, or
    /// `certificate` when given: the PEM the party was issued) with this
    /// directory's CA: writes a revocation list one version newer and
    /// removes the party from the enrollment list. Returns the new list.
    pub fn revoke_party(
        &self,
        name: &str,
        certificate: Option<&[u8]>,
    ) -> Result<crate::revocation::Revocations, Error> {
        let _lock = self.lock()?;
        let list = self.revoke_named(Role::Party, name, certificate, &self.party_cert(name))?;
        if self.federation_file().exists() {
            let enrolled: Vec<String> = self.enrolled()?.into_iter().filter(|p| p != name).collect();
            self.write_enrolled(&enrolled)?;
        }
        Ok(list)
    }

    /// Revokes the coordinator's certificate (`coordinator.pem` here, or
    /// `certificate`): parties holding the new list refuse to connect to a
    /// coordinator that shows it. Returns the new list.
    pub fn revoke_coordinator(&self, certificate: Option<&[u8]>) -> Result<crate::revocation::Revocations, Error> {
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let cert = match certificate {
            Some(c) => c.to_vec(),
            None => {
                let path = self.coordinator_cert();
                fs::read(&path).map_err(|source| Error::Io { path, source })?
            }
        };
        let der = pem_or_der(&cert, "certificate")?;
        if peer_identity(&der)?.role != Role::Coordinator {
            return Err(Error::InvalidInput("the certificate is not a coordinator certificate".into()));
        }
        self.add_revocation(&ca, &der)
    }

    /// Revokes relay `name`'s certificate (`relays/NAME.pem` here, or
    /// `certificate`): the coordinator closes every stream the relay
    /// carries and refuses it at the handshake. Returns the new list.
    pub fn revoke_relay(
        &self,
        name: &str,
        certificate: Option<&[u8]>,
    ) -> Result<crate::revocation::Revocations, Error> {
        let _lock = self.lock()?;
        self.revoke_named(Role::Relay, name, certificate, &self.relay_cert(name))
    }

    /// Revokes an admin certificate (`admin.pem` here, or `certificate`,
    /// which must name `name`): the coordinator refuses its calls from then
    /// on, on connections already open too. Returns the new list.
    pub fn revoke_admin(
        &self,
        name: &str,
        certificate: Option<&[u8]>,
    ) -> Result<crate::revocation::Revocations, Error> {
        let _lock = self.lock()?;
        self.revoke_named(Role::Admin, name, certificate, &self.admin_cert())
    }

    /// Revokes the certificate [`PkiDir::named_certificate`] finds.
    fn revoke_named(
        &self,
        role: Role,
        name: &str,
        given: Option<&[u8]>,
        kept: &Path,
    ) -> Result<crate::revocation::Revocations, Error> {
        let ca = self.load_ca()?;
        let der = self.named_certificate(role, name, given, kept)?;
        self.add_revocation(&ca, &der)
    }

    /// The certificate (DER) of `role` `name` to revoke: `given` (PEM or
    /// DER), or the one issued here at `kept`; refused unless it names them.
    fn named_certificate(&self, role: Role, name: &str, given: Option<&[u8]>, kept: &Path) -> Result<Vec<u8>, Error> {
        let what = match role {
            Role::Party => "party",
            Role::Relay => "relay",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
        };
        let cert = match given {
            Some(c) => c.to_vec(),
            None => fs::read(kept).map_err(|e| {
                Error::InvalidInput(format!(
                    "{}: {e} (no certificate of {what} {name} here; pass the one it was issued)",
                    kept.display()
                ))
            })?,
        };
        let der = pem_or_der(&cert, "certificate")?;
        let id = peer_identity(&der)?;
        if id.name != name || id.role != role {
            return Err(Error::InvalidInput(format!(
                "the certificate names {} ({:?}), not {what} {name}",
                id.name, id.role
            )));
        }
        Ok(der.to_vec())
    }

    /// Writes a revocation list one version newer that adds `cert_der`.
    /// Refused when the list file is missing or older than the last one
    /// this CA wrote (recorded in `revoked.version`): building on it would
    /// drop every revocation since (found by review).
    fn add_revocation(&self, ca: &FederationCa, cert_der: &[u8]) -> Result<crate::revocation::Revocations, Error> {
        let serial = crate::revocation::certificate_serial(cert_der)?;
        let current = self.revocations()?;
        let record = self.root.join("revoked.version");
        let written = match fs::read_to_string(&record) {
            Ok(t) => t.trim().parse::<u64>().map_err(|e| Error::InvalidInput(format!("{}: {e}", record.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(Error::Io { path: record, source }),
        };
        if current.version() < written {
            return Err(Error::InvalidInput(format!(
                "{} is version {} (or missing), but this CA wrote version {written}: restore the newest list \
                 before revoking (building on an older one would drop the revocations since)",
                self.revocation_file().display(),
                current.version()
            )));
        }
        let list = ca.revoke(&current, &serial)?;
        // (Written beside it and renamed over it: never half a list.)
        write_file(&self.revocation_file(), list.pem().as_bytes(), 0o644)?;
        write_file(&record, format!("{}\n", list.version()).as_bytes(), 0o644)?;
        Ok(list)
    }

    /// Creates a new federation: CA, coordinator certificate (for `hosts`;
    /// `localhost` and `127.0.0.1` are always included), admin certificate and
    /// one certificate per party. Refuses to overwrite an existing CA.
    pub fn init(&self, federation: &str, parties: &[String], hosts: &[String]) -> Result<(), Error> {
        // Every check before the first file: a refused init leaves nothing.
        for (i, p) in parties.iter().enumerate() {
            validate_party_name(p)?;
            if parties[..i].contains(p) {
                return Err(Error::InvalidInput(format!("party {p:?} is listed twice")));
            }
        }
        create_dir(&self.root)?;
        let _lock = self.lock()?;
        if self.ca_cert().exists() {
            return Err(Error::AlreadyExists(self.ca_cert().display().to_string()));
        }
        create_dir(&self.root.join("parties"))?;
        let ca = FederationCa::generate(federation)?;
        write_file(&self.ca_cert(), ca.cert_pem().as_bytes(), 0o644)?;
        write_file(&self.ca_key(), ca.key_pem().as_bytes(), 0o600)?;
        let coord = ca.issue(Role::Coordinator, COORDINATOR_NAME, &coordinator_sans(hosts))?;
        let serial = hex(&crate::revocation::certificate_serial(coord.cert_pem.as_bytes())?);
        write_file(&self.coordinator_issued(), format!("{serial}\n").as_bytes(), 0o644)?;
        write_pair(&self.coordinator_cert(), &self.coordinator_key(), &coord)?;
        let admin = ca.issue(Role::Admin, ADMIN_NAME, &[])?;
        // A new CA (init refuses an existing one): a new record.
        let serial = hex(&crate::revocation::certificate_serial(admin.cert_pem.as_bytes())?);
        write_file(&self.admin_issued(), format!("{serial}\n").as_bytes(), 0o644)?;
        write_pair(&self.admin_cert(), &self.admin_key(), &admin)?;
        let mut enrolled = Vec::new();
        for p in parties {
            let issued = ca.issue(Role::Party, p, &[])?;
            write_pair(&self.party_cert(p), &self.party_key(p), &issued)?;
            enrolled.push(p.clone());
        }
        self.write_enrolled(&enrolled)
    }

    /// Loads the CA of this directory.
    pub fn load_ca(&self) -> Result<FederationCa, Error> {
        let cert = read_string(&self.ca_cert())?;
        let key = read_private_key(&self.ca_key())?;
        let key = Zeroizing::new(
            String::from_utf8(key.to_vec())
                .map_err(|_| Error::InvalidInput(format!("{}: not a PEM file", self.ca_key().display())))?,
        );
        FederationCa::from_pem(&cert, &key)
    }

    /// Signs a party's certificate signing request with this directory's CA
    /// and enrolls the party: writes `parties/NAME.pem` (never a key: the
    /// key stayed with the party). Returns the name and the certificate path.
    pub fn sign_party_request(&self, csr_pem: &str) -> Result<(String, PathBuf), Error> {
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let (name, cert) = ca.sign_request(csr_pem, Role::Party)?;
        let mut enrolled = self.enrolled()?;
        if enrolled.iter().any(|p| p == &name) || self.party_cert(&name).exists() {
            return Err(Error::AlreadyExists(format!("party {name}")));
        }
        create_dir(&self.root.join("parties"))?;
        write_file(&self.party_cert(&name), cert.as_bytes(), 0o644)?;
        enrolled.push(name.clone());
        self.write_enrolled(&enrolled)?;
        let path = self.party_cert(&name);
        Ok((name, path))
    }

    /// A relay's certificate (`relays/NAME.pem`).
    pub fn relay_cert(&self, name: &str) -> PathBuf {
        self.root.join("relays").join(format!("{name}.pem"))
    }

    /// A relay's private key (`relays/NAME.key`).
    pub fn relay_key(&self, name: &str) -> PathBuf {
        self.root.join("relays").join(format!("{name}.key"))
    }

    /// Issues a relay certificate for `name`, served at `hosts` (DNS names
    /// or IP addresses the parties dial; `localhost` and `127.0.0.1` are
    /// always included). A relay is not enrolled: it can speak only for
    /// parties that sign a delegation to it.
    pub fn issue_relay(&self, name: &str, hosts: &[String]) -> Result<(), Error> {
        let _lock = self.lock()?;
        validate_party_name(name)?;
        if self.relay_cert(name).exists() {
            return Err(Error::AlreadyExists(format!("relay {name:?}")));
        }
        let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
        for h in hosts {
            if !sans.contains(h) {
                sans.push(h.clone());
            }
        }
        let ca = self.load_ca()?;
        let issued = ca.issue(Role::Relay, name, &sans)?;
        create_dir(&self.root.join("relays"))?;
        write_pair(&self.relay_cert(name), &self.relay_key(name), &issued)
    }

    /// Issues and enrolls one more party, leaving every other file untouched.
    pub fn issue_party(&self, name: &str) -> Result<(), Error> {
        let _lock = self.lock()?;
        validate_party_name(name)?;
        let mut enrolled = self.enrolled()?;
        if enrolled.iter().any(|p| p == name) || self.party_cert(name).exists() {
            return Err(Error::AlreadyExists(format!("party {name:?}")));
        }
        let ca = self.load_ca()?;
        let issued = ca.issue(Role::Party, name, &[])?;
        create_dir(&self.root.join("parties"))?;
        write_pair(&self.party_cert(name), &self.party_key(name), &issued)?;
        enrolled.push(name.to_owned());
        self.write_enrolled(&enrolled)
    }

    /// Issues a new administrator certificate and key in place of
    /// `admin.pem` and `admin.key`, once the one there is revoked: the way
    /// back after `revoke_admin`, and never a second valid one by accident
    /// (a missing or unreadable `admin.pem` is refused: whether the old
    /// certificate is revoked cannot be told).
    pub fn reissue_admin(&self) -> Result<(), Error> {
        let _lock = self.lock()?;
        let path = self.admin_cert();
        let pem = fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let der = pem_or_der(&pem, "certificate")?;
        if peer_identity(&der)?.role != Role::Admin {
            return Err(Error::InvalidInput(format!("{}: not an administrator certificate", path.display())));
        }
        // Every one issued here, not only the one in place: an older
        // revoked one put back from a backup would otherwise let a second
        // valid one be issued.
        let list = self.revocations()?;
        all_revoked(&list, &self.issued_admins()?, &self.admin_issued(), "administrator certificate", "")?;
        // (It parses, so a failed check means it is on the list.)
        if list.check(ADMIN_NAME, &der).is_ok() {
            return Err(Error::InvalidInput(format!(
                "{}: not revoked; revoke it first (confide certs revoke --admin {ADMIN_NAME})",
                path.display()
            )));
        }
        let ca = self.load_ca()?;
        let admin = ca.issue(Role::Admin, ADMIN_NAME, &[])?;
        // Recorded first: a certificate written but not recorded would be
        // one the check above does not know of. If it cannot be written,
        // the record is taken back (a serial recorded for no certificate
        // could never be revoked, and would block every later issue).
        let before = self.issued_admins()?;
        self.record_admin(&admin.cert_pem)?;
        write_pair(&self.admin_cert(), &self.admin_key(), &admin).inspect_err(|_| {
            // Unless the certificate is in place after all (the rename
            // went through and only the directory's sync failed): a
            // certificate there must stay on the record.
            if fs::read(self.admin_cert()).ok().as_deref() != Some(admin.cert_pem.as_bytes()) {
                let _ = write_file(&self.admin_issued(), format!("{}\n", before.join("\n")).as_bytes(), 0o644);
            }
        })
    }

    /// Issues a new coordinator certificate and key (`coordinator.pem`,
    /// `.key`, for `hosts` besides `localhost` and `127.0.0.1`) in place of
    /// a revoked one: refused while the one in place, or any other issued
    /// here, is not revoked, so two valid coordinator certificates never
    /// exist at once (a revoked one restored from a backup does not let a
    /// second valid one be issued).
    pub fn reissue_coordinator(&self, hosts: &[String]) -> Result<(), Error> {
        let _lock = self.lock()?;
        let path = self.coordinator_cert();
        let pem = fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        let der = pem_or_der(&pem, "certificate")?;
        if peer_identity(&der)?.role != Role::Coordinator {
            return Err(Error::InvalidInput(format!("{}: not a coordinator certificate", path.display())));
        }
        let list = self.revocations()?;
        let mut serials = read_serials(&self.coordinator_issued())?;
        let in_place = hex(&crate::revocation::certificate_serial(&pem)?);
        if !serials.contains(&in_place) {
            serials.push(in_place);
        }
        let how = " (confide certs revoke --coordinator)";
        all_revoked(&list, &serials, &self.coordinator_issued(), "coordinator certificate", how)?;
        let coord = self.load_ca()?.issue(Role::Coordinator, COORDINATOR_NAME, &coordinator_sans(hosts))?;
        // The pair first, then the record: a recorded serial whose
        // certificate was never written could never be revoked and would
        // block every later issue; a certificate written but not recorded
        // is the one in place, which the check above also reads.
        write_pair(&self.coordinator_cert(), &self.coordinator_key(), &coord)?;
        serials.push(hex(&crate::revocation::certificate_serial(coord.cert_pem.as_bytes())?));
        write_file(&self.coordinator_issued(), format!("{}\n", serials.join("\n")).as_bytes(), 0o644)
    }

    /// The enrolled party names, as listed in `federation.toml`.
    pub fn enrolled(&self) -> Result<Vec<String>, Error> {
        let path = self.federation_file();
        let text = read_string(&path)?;
        parse_enrollment(&text).map_err(|e| Error::InvalidInput(format!("{}: {e}", path.display())))
    }

    fn write_enrolled(&self, parties: &[String]) -> Result<(), Error> {
        let mut text = String::from(
            "# Parties enrolled in this federation. A party must hold a certificate signed by\n\
             # this federation's CA *and* be listed here. Edit with `confide certs issue`.\n\
             parties = [\n",
        );
        for p in parties {
            text.push_str(&format!("  \"{p}\",\n"));
        }
        text.push_str("]\n");
        write_file(&self.federation_file(), text.as_bytes(), 0o644)
    }
}

/// Parses the tiny `parties = ["a", "b"]` enrollment format without a TOML
/// dependency in this crate.
fn parse_enrollment(text: &str) -> Result<Vec<String>, String> {
    let body: String = text.lines().map(|l| l.split('#').next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let body = body.trim();
    let rest = body
        .strip_prefix("parties")
        .map(str::trim_start)
        .and_then(|r| r.strip_prefix('='))
        .map(str::trim)
        .ok_or("expected `parties = [ ... ]`")?;
    let inner =
        rest.strip_prefix('[').and_then(|r| r.strip_suffix(']')).ok_or("parties: expected a list in brackets")?;
    let mut out = Vec::new();
    for item in inner.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = item
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .ok_or_else(|| format!("parties: {item} is not a quoted name"))?;
        validate_party_name(name).map_err(|e| format!("parties: {e}"))?;
        out.push(name.to_owned());
    }
    Ok(out)
}

fn create_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// Reads a private key file, refusing one that others can read or write:
/// a key another local user could copy is no longer the owner's alone.
pub fn read_private_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, Error> {
    use std::io::Read as _;
    let io = |source| Error::Io { path: path.to_owned(), source };
    // The mode (and owner) of the file opened, not of the path before it is
    // opened: a file swapped in between would otherwise be read unchecked.
    let mut file = fs::File::open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let meta = file.metadata().map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::InvalidInput(format!(
                "{}: private key is accessible to other users (mode {mode:o}); run: chmod 600 {}",
                path.display(),
                path.display()
            )));
        }
        // Another user's file, even at 0600, is not this process's key.
        let me = fs::metadata("/proc/self").map(|m| m.uid()).ok();
        if me.is_some_and(|uid| uid != meta.uid() && uid != 0) {
            return Err(Error::InvalidInput(format!(
                "{}: private key belongs to another user (uid {})",
                path.display(),
                meta.uid()
            )));
        }
    }
    // Sized first: a buffer that grew would leave its earlier copies
    // unwiped.
    let len = file.metadata().map_err(io)?.len();
    let mut bytes = Zeroizing::new(Vec::with_capacity(usize::try_from(len).unwrap_or(0).saturating_add(1)));
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

fn read_string(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })
}

/// A coordinator certificate's names: `localhost`, `127.0.0.1`, its role
/// name, then `hosts`.
fn coordinator_sans(hosts: &[String]) -> Vec<String> {
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), COORDINATOR_NAME.into()];
    for h in hosts {
        if !sans.contains(h) {
            sans.push(h.clone());
        }
    }
    sans
}

/// Refuses unless every serial in `serials` (kept in `log`) is on `list`:
/// a new `what` is issued only once every earlier one is revoked (`how`
/// says how, when it helps).
fn all_revoked(
    list: &crate::revocation::Revocations,
    serials: &[String],
    log: &Path,
    what: &str,
    how: &str,
) -> Result<(), Error> {
    for serial in serials {
        let bytes = unhex(serial)
            .ok_or_else(|| Error::InvalidInput(format!("{}: {serial:?} is not a serial", log.display())))?;
        if !list.is_revoked(&bytes) {
            return Err(Error::InvalidInput(format!(
                "the {what} with serial {serial} issued here is not revoked; revoke it first{how}"
            )));
        }
    }
    Ok(())
}

/// The serials listed in `path`, one per line (none when it is missing).
fn read_serials(path: &Path) -> Result<Vec<String>, Error> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Io { path: path.to_owned(), source }),
    }
}

fn write_pair(cert: &Path, key: &Path, issued: &IssuedCert) -> Result<(), Error> {
    write_file(key, issued.key_pem.as_bytes(), 0o600)?;
    write_file(cert, issued.cert_pem.as_bytes(), 0o644)
}

/// Lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// [`hex`]'s inverse (either case); `None` for anything else.
fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

/// Writes a file with the given mode, in place of any file there: the mode
/// is set at creation so a private key is never readable by others, not
/// even briefly, and the new file is written beside it and renamed over it,
/// so a failed write leaves the old one (a revoked `admin.pem` that
/// `certs issue --admin` needs to see) rather than none.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let io = |source| Error::Io { path: tmp.clone(), source };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    if let Err(e) = written {
        // No partial file left behind (a private key's, say).
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    // The rename itself is durable only once the directory is synced: a
    // crash before that could bring back the old file (an unrevoked list).
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| Error::Io { path: dir.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An administrator certificate is issued again only once the one in
    /// place is revoked: never a second valid one, and never on a missing
    /// or foreign `admin.pem` (whether it is revoked cannot be told).
    #[test]
    fn an_administrator_certificate_is_issued_again_only_once_the_old_one_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into()], &[]).unwrap();
        let old = fs::read(pki.admin_cert()).unwrap();
        let e = pki.reissue_admin().unwrap_err().to_string();
        assert!(e.contains("not revoked"), "{e}");
        fs::copy(pki.party_cert("a"), pki.admin_cert()).unwrap();
        let e = pki.reissue_admin().unwrap_err().to_string();
        assert!(e.contains("not an administrator certificate"), "{e}");
        fs::remove_file(pki.admin_cert()).unwrap();
        assert!(pki.reissue_admin().is_err(), "a missing admin.pem");
        fs::write(pki.admin_cert(), &old).unwrap();
        let list = pki.revoke_admin(ADMIN_NAME, None).unwrap();
        pki.reissue_admin().unwrap();
        let new = fs::read(pki.admin_cert()).unwrap();
        assert_ne!(new, old);
        let der = |pem: &[u8]| pem_or_der(pem, "certificate").unwrap().to_vec();
        assert!(list.check(ADMIN_NAME, &der(&old)).is_err() && list.check(ADMIN_NAME, &der(&new)).is_ok());
        assert_eq!(fs::metadata(pki.admin_key()).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(pki.reissue_admin().unwrap_err().to_string().contains("not revoked"), "once only");
        // The first one, revoked, put back from a backup while the second
        // is valid: no third.
        fs::write(pki.admin_cert(), &old).unwrap();
        let e = pki.reissue_admin().unwrap_err().to_string();
        assert!(e.contains("issued here is not revoked"), "{e}");
        fs::write(pki.admin_cert(), &new).unwrap();
        pki.revoke_admin(ADMIN_NAME, None).unwrap();
        pki.reissue_admin().unwrap();
        assert_eq!(pki.issued_admins().unwrap().len(), 3);
        // A directory made before the record was kept: the one in place
        // alone is checked, revoked or not.
        fs::remove_file(pki.admin_issued()).unwrap();
        let e = pki.reissue_admin().unwrap_err().to_string();
        assert!(e.contains("admin.pem: not revoked"), "{e}");
        pki.revoke_admin(ADMIN_NAME, None).unwrap();
        pki.reissue_admin().unwrap();
        assert_eq!(pki.issued_admins().unwrap().len(), 1);
        // A record edited by hand into something else is refused, named.
        pki.revoke_admin(ADMIN_NAME, None).unwrap();
        fs::write(pki.admin_issued(), "+f\n").unwrap();
        let e = pki.reissue_admin().unwrap_err().to_string();
        assert!(e.contains("is not a serial"), "{e}");
    }

    /// Commands run at once on one directory (separate `PkiDir`s, as
    /// separate processes would be) each see the others' writes: every
    /// revocation is in the final list and every enrollment change is kept.
    /// Without the lock, two read the same version and one's entry is lost.
    #[test]
    fn commands_run_at_once_on_one_directory_lose_no_revocation_or_enrollment() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pki");
        let old: Vec<String> = (0..8).map(|i| format!("old{i}")).collect();
        PkiDir::new(&root).init("t", &old, &[]).unwrap();
        let certs: Vec<Vec<u8>> = old.iter().map(|p| fs::read(PkiDir::new(&root).party_cert(p)).unwrap()).collect();
        std::thread::scope(|scope| {
            for (i, name) in old.iter().enumerate() {
                let root = &root;
                scope.spawn(move || PkiDir::new(root).revoke_party(name, None).unwrap());
                scope.spawn(move || PkiDir::new(root).issue_party(&format!("new{i}")).unwrap());
            }
        });
        let pki = PkiDir::new(&root);
        let list = pki.revocations().unwrap();
        for (name, cert) in old.iter().zip(&certs) {
            let serial = crate::revocation::certificate_serial(cert).unwrap();
            assert!(list.is_revoked(&serial), "{name}'s revocation was lost");
        }
        let mut enrolled = pki.enrolled().unwrap();
        enrolled.sort();
        let want: Vec<String> = (0..8).map(|i| format!("new{i}")).collect();
        assert_eq!(enrolled, want);
    }

    /// A new coordinator certificate only once every one issued here is
    /// revoked: never two valid at once, a restored revoked one included.
    #[test]
    fn a_coordinator_certificate_is_reissued_only_once_the_old_one_is_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into()], &[]).unwrap();
        let first = fs::read(pki.coordinator_cert()).unwrap();
        let e = pki.reissue_coordinator(&[]).unwrap_err().to_string();
        assert!(e.contains("not revoked"), "{e}");
        pki.revoke_coordinator(None).unwrap();
        pki.reissue_coordinator(&["fl.example.org".into()]).unwrap();
        let second = fs::read(pki.coordinator_cert()).unwrap();
        assert_ne!(first, second);
        let der = pem_der_of(&String::from_utf8(second.clone()).unwrap());
        assert_eq!(peer_identity(&der).unwrap().role, Role::Coordinator);
        assert!(pki.revocations().unwrap().check(COORDINATOR_NAME, &der).is_ok(), "the new one is valid");
        // The revoked first one put back (a backup): the second, not
        // revoked, still blocks a third.
        fs::write(pki.coordinator_cert(), &first).unwrap();
        let e = pki.reissue_coordinator(&[]).unwrap_err().to_string();
        assert!(e.contains("not revoked"), "{e}");
    }

    /// A revocation built on a missing or older list file (a restored
    /// backup) would drop every revocation since: refused, naming the
    /// version this CA wrote (found by review).
    #[test]
    fn a_revocation_on_a_missing_or_older_list_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into(), "b".into(), "c".into()], &[]).unwrap();
        pki.revoke_party("a", None).unwrap();
        let v1 = fs::read(pki.revocation_file()).unwrap();
        pki.revoke_party("b", None).unwrap();
        fs::write(pki.revocation_file(), &v1).unwrap();
        let e = pki.revoke_party("c", None).unwrap_err().to_string();
        assert!(e.contains("this CA wrote version 2"), "{e}");
        fs::remove_file(pki.revocation_file()).unwrap();
        assert!(pki.revoke_party("c", None).is_err(), "nor on a missing one");
        assert!(pki.enrolled().unwrap().contains(&"c".to_string()), "c still enrolled");
    }

    #[test]
    fn a_party_key_made_elsewhere_is_certified_from_its_request_alone() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into()], &[]).unwrap();
        let party_machine = dir.path().join("d-machine");
        let (key, csr) = write_key_request(&party_machine, "d").unwrap();
        assert_eq!(fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_key_request(&party_machine, "d").is_err(), "never overwrites a key");
        let csr_pem = fs::read_to_string(&csr).unwrap();
        let (name, cert) = pki.sign_party_request(&csr_pem).unwrap();
        assert_eq!(name, "d");
        assert!(!pki.party_key("d").exists(), "the CA side never sees or writes the key");
        assert_eq!(pki.enrolled().unwrap(), ["a", "d"]);
        // The certificate is for the party's own key, names it, and has the party role.
        let der = pem_der_of(&fs::read_to_string(&cert).unwrap());
        let id = peer_identity(&der).unwrap();
        assert_eq!((id.name.as_str(), id.role), ("d", Role::Party));
        let signer = crate::identity::IdentityKey::from_pem(&read_private_key(&key).unwrap()).unwrap();
        let mut verifier = crate::identity::CertVerifier::new(fs::read(pki.ca_cert()).unwrap().as_slice()).unwrap();
        verifier.add_peer("d", &der).unwrap();
        use crate::secagg::protocol::{IdentitySigner, IdentityVerifier};
        verifier.verify("d", b"m", &signer.sign(b"m").unwrap()).unwrap();
        // Signing again, a tampered request, or a reserved name: refused.
        assert!(pki.sign_party_request(&csr_pem).is_err(), "already enrolled");
        let mut tampered = csr_pem.clone().into_bytes();
        let i = tampered.len() / 2;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        assert!(pki.sign_party_request(&String::from_utf8(tampered).unwrap()).is_err());
        assert!(party_key_request("confide-admin").is_err());
    }

    /// A request is signed only for the one name its bytes carry: two CNs
    /// (rcgen kept the last, tools show the first; found by review), other
    /// subject attributes, or a key other than P-256 are refused, and the
    /// key's fingerprint identifies the request out of band.
    #[test]
    fn a_request_with_two_names_another_attribute_or_another_key_type_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("t", &["a".into()], &[]).unwrap();
        let request = |dn: &[(DnType, &str)], key: &KeyPair| {
            let mut params = CertificateParams::new(vec!["hospital-c".to_owned()]).unwrap();
            let mut names = DistinguishedName::new();
            for (t, v) in dn {
                names.push(t.clone(), *v);
            }
            params.distinguished_name = names;
            params.serialize_request(key).unwrap().pem().unwrap()
        };
        let p256 = KeyPair::generate().unwrap();
        let cn_again = DnType::CustomDnType(vec![2, 5, 4, 3]);
        let two = request(&[(DnType::CommonName, "hospital-c"), (cn_again, "hospital-b")], &p256);
        let e = pki.sign_party_request(&two).unwrap_err().to_string();
        assert!(e.contains("2 subject CNs"), "{e}");
        let country = request(&[(DnType::CommonName, "hospital-c"), (DnType::CountryName, "CH")], &p256);
        let e = pki.sign_party_request(&country).unwrap_err().to_string();
        assert!(e.contains("other than CN, OU and O"), "{e}");
        let ed25519 = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let e = pki.sign_party_request(&request(&[(DnType::CommonName, "hospital-c")], &ed25519)).unwrap_err();
        assert!(e.to_string().contains("not ECDSA P-256"), "{e}");
        assert_eq!(pki.enrolled().unwrap(), ["a"], "nothing enrolled");
        let one = request(&[(DnType::CommonName, "hospital-c")], &p256);
        let print = request_key_fingerprint(&one).unwrap();
        assert_eq!(print.len(), 64);
        assert_eq!(request_key_fingerprint(&country).unwrap(), print, "the key's, not the request's");
        assert_ne!(request_key_fingerprint(&party_key_request("d").unwrap().csr_pem).unwrap(), print);
        // A file with a second block, or one hidden from a line-based PEM
        // parser (a leading space), would have the checks and the signature
        // read different requests: refused.
        let genuine = party_key_request("hospital-d").unwrap().csr_pem;
        for crafted in [format!(" {one}\n{genuine}"), format!("{one}{genuine}"), format!("note\n{genuine}")] {
            let e = pki.sign_party_request(&crafted).unwrap_err().to_string();
            assert!(e.contains("exactly one CERTIFICATE REQUEST block"), "{e}");
            assert!(request_key_fingerprint(&crafted).is_err());
        }
        assert_eq!(pki.sign_party_request(&one).unwrap().0, "hospital-c");
    }

    fn pem_der_of(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    #[test]
    fn not_after_reads_the_issued_expiry() {
        let ca = FederationCa::generate("t").unwrap();
        let until = OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        let issued = ca.issue_with_validity(Role::Party, "a", &[], until - Duration::days(1), until).unwrap();
        assert_eq!(not_after(&pem_der_of(&issued.cert_pem)).unwrap(), 2_000_000_000);
        assert!(not_after(b"not a certificate").is_err());
    }

    #[test]
    fn private_keys_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        fs::write(&path, b"-----BEGIN PRIVATE KEY-----").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o644, false), (0o640, false), (0o602, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let r = read_private_key(&path);
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {:?}", r.err());
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod 600") && e.to_string().contains("k.pem"), "{e}");
            }
        }
    }

    #[test]
    fn init_writes_role_tagged_certs_and_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("test", &["hospital-a".into(), "hospital-b".into()], &["coord.example".into()]).unwrap();
        assert_eq!(pki.enrolled().unwrap(), vec!["hospital-a", "hospital-b"]);
        for key in [pki.ca_key(), pki.admin_key(), pki.party_key("hospital-a"), pki.coordinator_key()] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let pem = fs::read_to_string(pki.party_cert("hospital-b")).unwrap();
        let der = rustls_pem_to_der(&pem);
        assert_eq!(peer_identity(&der).unwrap(), PeerIdentity { name: "hospital-b".into(), role: Role::Party });
        let admin = rustls_pem_to_der(&fs::read_to_string(pki.admin_cert()).unwrap());
        assert_eq!(peer_identity(&admin).unwrap().role, Role::Admin);
        assert!(matches!(pki.init("again", &[], &[]), Err(Error::AlreadyExists(_))));
    }

    #[test]
    fn a_refused_init_writes_nothing_and_can_be_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        let err = pki.init("test", &["a".into(), "b".into(), "a".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("\"a\" is listed twice"), "{err}");
        assert!(!pki.ca_cert().exists() && !pki.ca_key().exists());
        pki.init("test", &["a".into(), "b".into()], &[]).unwrap();
        assert_eq!(pki.enrolled().unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn issue_adds_one_party_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("test", &["a".into()], &[]).unwrap();
        let before = fs::read(pki.party_cert("a")).unwrap();
        pki.issue_party("b").unwrap();
        assert_eq!(fs::read(pki.party_cert("a")).unwrap(), before);
        assert_eq!(pki.enrolled().unwrap(), vec!["a", "b"]);
        assert!(pki.issue_party("b").is_err());
        assert!(pki.issue_party("Bad Name").is_err());
    }

    #[test]
    fn party_names_are_validated() {
        for bad in ["", "A", "-x", "x y", ADMIN_NAME, "coordinator", &"a".repeat(64)] {
            assert!(validate_party_name(bad).is_err(), "{bad:?}");
        }
        for good in ["a", "hospital-a", "site_1.eu"] {
            validate_party_name(good).unwrap();
        }
    }

    #[test]
    fn enrollment_parser_rejects_garbage() {
        assert!(parse_enrollment("parties = [\"a\", b]").is_err());
        assert!(parse_enrollment("nothing").is_err());
        assert_eq!(parse_enrollment("# c\nparties = []\n").unwrap(), Vec::<String>::new());
    }

    fn rustls_pem_to_der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&b64)
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut buf = 0u32;
        let mut bits = 0;
        for c in s.bytes().filter(|&c| c != b'=') {
            let v = table.iter().position(|&t| t == c).unwrap() as u32;
            buf = (buf << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((buf >> bits) as u8);
            }
        }
        out
    }
}
