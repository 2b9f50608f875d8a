//! Joint inference: an edge service's hard examples answered by a cloud
//! party's model, through the coordinator, encrypted end to end.
//!
//! The cloud tier of a service is part of its signed deployment
//! ([`JointConfig`]): which party, which of its services, which answers are
//! hard, how long to wait. An edge party forwards a row only if its own
//! `policy.share_inputs` allows that cloud party for the service, only to a
//! key that party signed with its certificate (verified against the CA and
//! the revocation list), and only after the audit log holds a record of it.
//! Otherwise, or when the cloud does not answer in time, the edge answers
//! the hard rows itself and says so.
//!
//! The edge keeps a cloud key only if it is no older than the one it holds
//! (a replayed announcement cannot bring back a key the cloud replaced),
//! and checks the cloud's certificate against the revocation list in force
//! again at every request. It signs each sealed request with its own
//! certificate key; the cloud answers only requests their named sender
//! signed (and, with `[cloud] accept_from`, only those parties'), at most
//! [`MAX_FORWARDS_IN_FLIGHT`] at a time, and seals its answer with a fresh
//! nonce and its probabilities at a fixed width, so that the answer's
//! length says nothing of them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use confide_crypto::identity::{CertVerifier, IdentityKey, SharedRevocations};
use confide_crypto::sealed::{CloudSecret, SealedRequest, request_transcript, seal_request, verify_cloud_key};
use confide_crypto::secagg::protocol::{IdentitySigner, IdentityVerifier};
use confide_proto::deploy::JointConfig;
use confide_proto::pb;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditLog, ForwardedInput, rows_sha256};

/// A cloud party's verified key for one of its services.
#[derive(Debug, Clone)]
struct PeerKey {
    public: [u8; 32],
    /// When the cloud party signed it (its clock, Unix seconds).
    issued_at: u64,
    /// The certificate that signed it (DER), checked again at each request.
    certificate: Vec<u8>,
    /// SHA-256 of the certificate that signed it, hex (for the audit log).
    certificate_sha256: String,
}

/// Forwarded requests a cloud party answers at once, their answers' sending
/// included; more are refused as busy (each holds up to a message's bytes
/// and a prediction).
pub const MAX_FORWARDS_IN_FLIGHT: usize = 16;

/// Forwarded requests from one edge party a cloud party answers at once:
/// one edge cannot take every slot, so at least 4 stay for the others
/// (whose requests would otherwise be refused as busy and fall back to
/// their own answers), while a lone edge still has most of them.
pub const MAX_FORWARDS_PER_EDGE: usize = 12;

/// A slot to answer one forwarded request in (cloud side): one of the
/// [`MAX_FORWARDS_IN_FLIGHT`], and one of its edge's
/// [`MAX_FORWARDS_PER_EDGE`], both freed when it is dropped.
pub struct ForwardSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    edge: String,
    per_edge: std::sync::Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        let mut counts = self.per_edge.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.edge) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.edge);
            }
        }
    }
}

/// Service keys kept per cloud party (see [`Joint::on_cloud_key`]).
const MAX_KEYS_PER_CLOUD: usize = 64;

/// How far past this party's clock a cloud key's making time may be.
const MAX_KEY_CLOCK_SKEW_SECS: u64 = 3600;

struct Pending {
    cloud: String,
    reply: tokio::sync::oneshot::Sender<Result<Vec<u8>, String>>,
}

/// Which model version answered a forwarded row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudVersion {
    /// The cloud party.
    pub party: String,
    /// Its service.
    pub service: String,
    /// The deployment that answered.
    pub sequence: u64,
    /// Its job.
    pub job_id: String,
    /// Its round.
    pub round: u32,
    /// Its model's SHA-256.
    pub sha256: String,
}

/// What the cloud party seals back. The probabilities travel as the hex of
/// their little-endian f32 bytes: 8 characters each, whatever the value
/// (a JSON number's length would tell the coordinator how confident the
/// cloud was).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudAnswer {
    classes: usize,
    #[serde(with = "fixed_width")]
    probabilities: Vec<f32>,
    version: CloudVersion,
}

/// [`CloudAnswer::probabilities`] at a fixed width.
mod fixed_width {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let mut text = String::with_capacity(8 * values.len());
        for v in values {
            for b in v.to_le_bytes() {
                text.push_str(&format!("{b:02x}"));
            }
        }
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let text = String::deserialize(d)?;
        let bad = || serde::de::Error::custom("probabilities: not 8 hex digits per value");
        if !text.len().is_multiple_of(8) || !text.is_ascii() {
            return Err(bad());
        }
        text.as_bytes()
            .chunks(8)
            .map(|c| {
                let mut b = [0u8; 4];
                for (i, byte) in b.iter_mut().enumerate() {
                    let pair = std::str::from_utf8(&c[2 * i..2 * i + 2]).map_err(|_| bad())?;
                    *byte = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
                }
                Ok(f32::from_le_bytes(b))
            })
            .collect()
    }
}

/// The joint-inference state of a party: its policy, audit log and the
/// cloud keys it verified (edge side), and its own keys (cloud side).
pub struct Joint {
    share_inputs: BTreeMap<String, Vec<String>>,
    audit: Result<Arc<AuditLog>, String>,
    ca_pem: Vec<u8>,
    revocations: SharedRevocations,
    peers: RwLock<HashMap<(String, String), PeerKey>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    /// `[cloud] services`, their key pairs and when each was made (its
    /// file's modification time, Unix seconds): what its announcements say,
    /// so that an edge can tell a replaced key from its replacement.
    secrets: BTreeMap<String, (CloudSecret, u64)>,
    /// `[cloud] accept_from`: the edge parties answered (empty: any).
    accept_from: Vec<String>,
    /// This party's certificate key: signs its cloud keys and its
    /// forwarded requests.
    identity: Option<IdentityKey>,
    /// This party's certificate (DER), sent with its forwarded requests.
    certificate: Vec<u8>,
    /// Forwarded requests being answered (cloud side).
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
    /// How many of them each edge sent (cloud side).
    per_edge: std::sync::Arc<Mutex<HashMap<String, usize>>>,
    /// The stream's message limit (`limits.max_message_bytes`): a request
    /// or an answer above it is not sent (its encoding would fail and end
    /// the stream).
    max_message_bytes: usize,
    /// The coordinator's message limit, from its welcome (it may be below
    /// this party's): a message it could not read would end the stream.
    coordinator_max_message_bytes: AtomicUsize,
}

/// Room kept below a message limit for what the coordinator changes in a
/// forwarded request or answer on its way (the sender's name in place of
/// the receiver's).
const FORWARD_MARGIN_BYTES: usize = 1024;

/// The additional authenticated data of one forwarded request.
pub fn context(edge: &str, cloud: &str, service: &str, cloud_service: &str, request_id: u64) -> Vec<u8> {
    format!("confide-joint-v1/{edge}/{cloud}/{service}/{cloud_service}/{request_id}").into_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    super::sha256_hex(bytes)
}

/// Loads (or makes, mode 0600) the key pair of cloud service `service` in
/// `dir`, with when it was made. Read as private keys are (refused when
/// others can read it); made crash-safely (a synced temporary file linked
/// into place, never over another process's key, and the directory synced),
/// so a crash mid-way leaves no short key file that stops every later start
/// (found by review).
fn cloud_secret(dir: &Path, service: &str) -> Result<(CloudSecret, u64), String> {
    let path = dir.join(format!("cloud-{service}.key"));
    let bad = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    match std::fs::symlink_metadata(&path) {
        Ok(_) => read_cloud_secret(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = CloudSecret::generate(&mut rand_core::OsRng);
            let made = crate::audit::unix_now_ms() / 1000;
            // Sized once: no reallocation leaves an unwiped copy of the key.
            let mut contents = zeroize::Zeroizing::new(Vec::with_capacity(40));
            contents.extend_from_slice(secret.to_bytes().as_slice());
            contents.extend_from_slice(&made.to_le_bytes());
            let tmp = dir.join(format!(".cloud-{service}.key.part"));
            // A leftover of a crash is removed first (it may still be a
            // link to a key moved aside), and the new file is made anew.
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bad(&e)),
                _ => {}
            }
            let written = write_private(&tmp, &contents).and_then(|()| match std::fs::hard_link(&tmp, &path) {
                // A file system without hard links: made in place, never
                // over an existing key (not crash-safe there).
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => write_private(&path, &contents),
                other => other,
            });
            let _ = std::fs::remove_file(&tmp);
            match written {
                Ok(()) => {
                    confide_proto::durable::sync_parent(&path, &mut |_| {})?;
                    Ok((secret, made))
                }
                // Another process made it meanwhile: that key is the one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_cloud_secret(&path),
                Err(e) => Err(bad(&e)),
            }
        }
        Err(e) => Err(bad(&e)),
    }
}

/// A new file of `bytes`, mode 0600, synced (never over an existing one).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Reads a cloud key file: the key, then when it was made (Unix seconds,
/// little-endian), kept in the file so that a copy or a restore from a
/// backup does not change its age; a 32-byte file from before has its
/// modification time.
fn read_cloud_secret(path: &Path) -> Result<(CloudSecret, u64), String> {
    let bad = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let bytes = confide_crypto::pki::read_private_key(path).map_err(|e| e.to_string())?;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    let made = match bytes.len() {
        40 => {
            key.copy_from_slice(&bytes[..32]);
            let mut made = [0u8; 8];
            made.copy_from_slice(&bytes[32..]);
            u64::from_le_bytes(made)
        }
        32 => {
            key.copy_from_slice(&bytes);
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map_err(|e| bad(&e))?
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        }
        n => {
            return Err(bad(&format_args!(
                "not a cloud key ({n} bytes where a key has 32 and its making time 8); if nothing else wrote it, \
                 move it away and restart: a new key is made, and the edges fetch it"
            )));
        }
    };
    Ok((CloudSecret::from_bytes(&key), made))
}

impl Joint {
    /// The state for `config`, with cloud keys kept in `dir`.
    pub fn open(
        config: &crate::config::PartyConfig,
        dir: &Path,
        ca_pem: Vec<u8>,
        revocations: SharedRevocations,
    ) -> Result<Joint, String> {
        let mut secrets = BTreeMap::new();
        for s in &config.cloud.services {
            secrets.insert(s.clone(), cloud_secret(dir, s)?);
        }
        // Needed to sign cloud keys (a cloud party) or requests (a party
        // that may forward).
        let (identity, certificate) = if secrets.is_empty() && config.policy.share_inputs.is_empty() {
            (None, Vec::new())
        } else {
            let pem = confide_crypto::pki::read_private_key(&config.key).map_err(|e| e.to_string())?;
            let key = IdentityKey::from_pem(&pem).map_err(|e| format!("{}: {e}", config.key.display()))?;
            let certs = confide_proto::net::load_certs(&config.cert).map_err(|e| e.to_string())?;
            let own = certs.first().ok_or_else(|| format!("{}: no certificate", config.cert.display()))?;
            (Some(key), own.to_vec())
        };
        Ok(Joint {
            share_inputs: config.policy.share_inputs.clone(),
            // A log that cannot be opened stops forwarding, not serving.
            audit: AuditLog::open(&config.audit_log_path()).map(Arc::new),
            ca_pem,
            revocations,
            peers: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            // From a random point: a restarted edge's ids do not meet its
            // previous run's, whose answers may still be on their way.
            next_id: AtomicU64::new(rand_core::RngCore::next_u64(&mut rand_core::OsRng) >> 2),
            secrets,
            accept_from: config.cloud.accept_from.clone(),
            identity,
            certificate,
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_FORWARDS_IN_FLIGHT)),
            per_edge: std::sync::Arc::default(),
            max_message_bytes: config.limits.max_message_bytes,
            coordinator_max_message_bytes: AtomicUsize::new(usize::MAX),
        })
    }

    /// This party's signed cloud keys, to announce on each connection.
    pub fn announcements(&self, me: &str) -> Vec<pb::CloudKey> {
        let Some(id) = &self.identity else { return Vec::new() };
        self.secrets
            .iter()
            .filter_map(|(service, (s, made))| {
                let signature = s.sign(id, me, service, *made).ok()?;
                Some(pb::CloudKey {
                    service: service.clone(),
                    public_key: s.public().to_vec(),
                    issued_at: *made,
                    signature,
                })
            })
            .collect()
    }

    /// A cloud key the coordinator relayed: kept if its party's certificate
    /// is the CA's (not revoked), that party signed it, and it is no older
    /// than the one held for that party and service.
    pub fn on_cloud_key(&self, a: &pb::CloudKeyAnnouncement) -> Result<(), String> {
        let key = a.key.as_ref().ok_or("a cloud key announcement without a key")?;
        // Checked here, not only by the coordinator that relays it: a name
        // far longer than a service's would otherwise be kept and logged.
        confide_proto::deploy::validate_service_name(&key.service)
            .map_err(|e| format!("a cloud key announcement's cloud_key.service: {e}"))?;
        if a.party.len() > 256 {
            return Err(format!("a cloud key announcement's party is {} bytes long; names are shorter", a.party.len()));
        }
        let public: [u8; 32] =
            key.public_key.as_slice().try_into().map_err(|_| "a cloud key that is not 32 bytes".to_string())?;
        let mut verifier =
            CertVerifier::with_revocations(&self.ca_pem, self.revocations.clone()).map_err(|e| e.to_string())?;
        verifier.add_peer(&a.party, &a.certificate).map_err(|e| format!("cloud key of {}: {e}", a.party))?;
        verify_cloud_key(&verifier, &a.party, &key.service, &public, key.issued_at, &key.signature)
            .map_err(|e| format!("cloud key of {} for {}: {e}", a.party, key.service))?;
        let peer = PeerKey {
            public,
            issued_at: key.issued_at,
            certificate: a.certificate.clone(),
            certificate_sha256: sha256_hex(&a.certificate),
        };
        // A key made far in this party's future cannot be told from one
        // kept to outlast its replacements.
        let now = crate::audit::unix_now_ms() / 1000;
        if key.issued_at > now + MAX_KEY_CLOCK_SKEW_SECS {
            return Err(format!(
                "cloud key of {} for {} made at {}, over an hour after this party's clock ({now})",
                a.party, key.service, key.issued_at
            ));
        }
        // Only the keys of cloud parties this party's policy may share
        // inputs with, and a bounded number of each one's services: any
        // enrolled party can sign keys for as many service names as it
        // likes, and the coordinator relays them.
        if !self.share_inputs.values().any(|clouds| clouds.contains(&a.party)) {
            return Ok(());
        }
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let pair = (a.party.clone(), key.service.clone());
        if !peers.contains_key(&pair) && peers.keys().filter(|(p, _)| *p == a.party).count() >= MAX_KEYS_PER_CLOUD {
            return Err(format!(
                "cloud key of {} for {}: this party already holds {MAX_KEYS_PER_CLOUD} of {}'s service keys",
                a.party, key.service, a.party
            ));
        }
        if let Some(held) = peers.get(&pair)
            && (key.issued_at < held.issued_at || (key.issued_at == held.issued_at && public != held.public))
        {
            return Err(format!(
                "cloud key of {} for {} made at {}: not newer than the one held (made at {}); a replaced key is \
                 not taken back",
                a.party, key.service, key.issued_at, held.issued_at
            ));
        }
        peers.insert(pair, peer);
        Ok(())
    }

    /// How many service keys of `party` are held.
    #[cfg(test)]
    pub(super) fn keys_of(&self, party: &str) -> usize {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).keys().filter(|(p, _)| p == party).count()
    }

    /// Whether `service`'s inputs may go to `cloud` under the local policy.
    fn may_share(&self, service: &str, cloud: &str) -> bool {
        self.share_inputs.get(service).is_some_and(|c| c.iter().any(|x| x == cloud))
    }

    /// Forwards `rows` (`width` features each) of edge service `service` to
    /// the cloud tier `j`, and waits for the answer: the cloud's
    /// probabilities and version, or why the edge must answer itself.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        &self,
        me: &str,
        uplink: Option<tokio::sync::mpsc::Sender<pb::PartyMessage>>,
        service: &str,
        j: &JointConfig,
        rows: &[f32],
        width: usize,
        classes: usize,
    ) -> Result<(Vec<f32>, CloudVersion), String> {
        if !self.may_share(service, &j.cloud) {
            return Err(format!("policy.share_inputs does not allow {} for service {service}", j.cloud));
        }
        let peer = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(j.cloud.clone(), j.cloud_service.clone()))
            .cloned()
            .ok_or_else(|| format!("no verified key of {} for {}", j.cloud, j.cloud_service))?;
        // Its certificate against the list in force now: a cloud revoked
        // (or expired) since its key came is sent nothing more.
        let mut verifier =
            CertVerifier::with_revocations(&self.ca_pem, self.revocations.clone()).map_err(|e| e.to_string())?;
        if let Err(e) = verifier.add_peer(&j.cloud, &peer.certificate) {
            // Unless a newer key (another certificate) came meanwhile.
            let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
            let key = (j.cloud.clone(), j.cloud_service.clone());
            if peers.get(&key).is_some_and(|held| held.certificate == peer.certificate) {
                peers.remove(&key);
            }
            drop(peers);
            return Err(format!("{}'s certificate no longer checks ({e}); its key is dropped", j.cloud));
        }
        let identity = self.identity.as_ref().ok_or("no certificate key to sign forwarded requests with")?;
        let uplink = uplink.ok_or("not connected to the coordinator")?;
        let audit = self.audit.as_ref().map_err(|e| format!("the audit log is not writable ({e})"))?.clone();
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ctx = context(me, &j.cloud, service, &j.cloud_service, request_id);
        let mut plain = Vec::with_capacity(4 + rows.len() * 4);
        plain.extend_from_slice(&(width as u32).to_le_bytes());
        for v in rows {
            plain.extend_from_slice(&v.to_le_bytes());
        }
        let (sealed, reply_key) =
            seal_request(&peer.public, &ctx, &plain, &mut rand_core::OsRng).map_err(|e| e.to_string())?;
        let signature = identity.sign(&request_transcript(&ctx, &sealed)).map_err(|e| e.to_string())?;
        let msg = pb::PartyMessage {
            body: Some(pb::party_message::Body::Forward(pb::Forward {
                request_id,
                peer: j.cloud.clone(),
                service: service.to_owned(),
                cloud_service: j.cloud_service.clone(),
                ephemeral: sealed.ephemeral.to_vec(),
                ciphertext: sealed.ciphertext,
                signature,
                certificate: self.certificate.clone(),
            })),
        };
        // Checked before anything is logged or sent: a message the stream
        // cannot carry would end it (and the party's training with it).
        let size = prost::Message::encoded_len(&msg);
        let limit = self.forward_limit();
        if size > limit {
            return Err(format!(
                "{} hard rows of {width} features make a forwarded request of {size} bytes, above the {limit} the \
                 stream carries (limits.max_message_bytes here and at the coordinator, less {FORWARD_MARGIN_BYTES})",
                rows.len() / width.max(1),
            ));
        }
        // Logged and synced before it leaves.
        // On a blocking thread: the sync must not hold the runtime's
        // workers (two here), which carry every stream.
        let entry = ForwardedInput {
            time_ms: crate::audit::unix_now_ms(),
            service: service.to_owned(),
            input_sha256: rows_sha256(rows),
            rows: rows.len() / width.max(1),
            destination: j.cloud.clone(),
            destination_certificate_sha256: peer.certificate_sha256.clone(),
            request_id,
        };
        tokio::task::spawn_blocking(move || audit.record(&entry))
            .await
            .map_err(|e| format!("the audit log's writer failed: {e}"))??;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request_id, Pending { cloud: j.cloud.clone(), reply: tx });
        // Taken out however this ends, a dropped request (its client gone)
        // included.
        struct Unpend<'a>(&'a Mutex<HashMap<u64, Pending>>, u64);
        impl Drop for Unpend<'_> {
            fn drop(&mut self) {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
            }
        }
        let unpend = Unpend(&self.pending, request_id);
        // The wait for room on the stream counts in the timeout too: a busy
        // stream (training's transfers share it) must not hold the request
        // past it, when the edge's own answer is there to fall back on.
        let outcome = tokio::time::timeout(std::time::Duration::from_millis(j.timeout_ms), async {
            uplink.send(msg).await.map_err(|_| "the coordinator stream closed".to_string())?;
            match rx.await {
                Ok(r) => r,
                Err(_) => Err("the request was dropped".into()),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {} within {} ms", j.cloud, j.timeout_ms)));
        drop(unpend);
        let ciphertext = outcome?;
        let answer = reply_key.open(&ctx, &ciphertext).map_err(|e| format!("the cloud's answer: {e}"))?;
        let answer: CloudAnswer =
            // (serde quotes the bad input: bounded, as a cloud chooses it.)
            serde_json::from_slice(&answer).map_err(|e| {
                let e: String = e.to_string().chars().take(200).collect();
                format!("the cloud's answer is not one: {e}")
            })?;
        let n = rows.len() / width.max(1);
        if answer.classes != classes || answer.probabilities.len() != n * classes {
            return Err(format!(
                "the cloud answered {} values in {} classes for {n} rows of {classes} classes",
                answer.probabilities.len(),
                answer.classes
            ));
        }
        if answer.probabilities.iter().any(|p| !p.is_finite() || *p < 0.0 || *p > 1.0) {
            return Err("the cloud answered values that are not probabilities".into());
        }
        // What the cloud says of its version reaches the edge's clients (the
        // answer's provenance): checked as a record's fields are, so a cloud
        // cannot hand them megabytes or a digest that is not one.
        confide_proto::validate_job_id(&answer.version.job_id)
            .map_err(|e| format!("the cloud's answer: version.{e}"))?;
        let sha = &answer.version.sha256;
        if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err("the cloud's answer: version.sha256 is not 64 lowercase hex digits".into());
        }
        Ok((answer.probabilities, answer.version))
    }

    /// An answer (or the coordinator's refusal) for a pending request.
    pub fn on_answer(&self, a: pb::ForwardAnswer) -> Result<(), String> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = pending.get(&a.request_id) else { return Ok(()) };
        if p.cloud != a.peer {
            let from: String = a.peer.chars().take(64).collect();
            return Err(format!("an answer to request {} from {from:?}, not from {}", a.request_id, p.cloud));
        }
        let Some(p) = pending.remove(&a.request_id) else { return Ok(()) };
        // The coordinator's words, passed on to the client: bounded.
        let r = if a.error.is_empty() {
            Ok(a.ciphertext)
        } else {
            Err(a.error.chars().take(super::MAX_FALLBACK_CHARS).collect())
        };
        let _ = p.reply.send(r);
        Ok(())
    }

    /// A stream is open: its coordinator reads messages of up to
    /// `coordinator_max_message_bytes`.
    pub fn connected(&self, coordinator_max_message_bytes: usize) {
        self.coordinator_max_message_bytes.store(coordinator_max_message_bytes, Ordering::Relaxed);
    }

    /// The largest forwarded request or answer sent: below both ends'
    /// limits, with room for the coordinator's changes on its way.
    fn forward_limit(&self) -> usize {
        self.max_message_bytes
            .min(self.coordinator_max_message_bytes.load(Ordering::Relaxed))
            .saturating_sub(FORWARD_MARGIN_BYTES)
    }

    /// Drops every pending request (the stream closed): they fall back now.
    pub fn disconnected(&self) {
        for (_, p) in self.pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = p.reply.send(Err("the coordinator stream closed".into()));
        }
    }

    /// Cloud side: a slot to answer one forwarded request of `edge` in, or
    /// `None` when [`MAX_FORWARDS_IN_FLIGHT`] are being answered, or
    /// [`MAX_FORWARDS_PER_EDGE`] of that edge's.
    pub fn forward_slot(&self, edge: &str) -> Option<ForwardSlot> {
        let mut counts = self.per_edge.lock().unwrap_or_else(|p| p.into_inner());
        if counts.get(edge).is_some_and(|n| *n >= MAX_FORWARDS_PER_EDGE) {
            return None;
        }
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        *counts.entry(edge.to_owned()).or_default() += 1;
        Some(ForwardSlot { _permit: permit, edge: edge.to_owned(), per_edge: self.per_edge.clone() })
    }

    /// Cloud side: opens a forwarded request for one of this party's cloud
    /// services, if its named sender signed it (and `[cloud] accept_from`
    /// names it, when set); returns the rows, their width and the key for
    /// the answer.
    pub fn open_request(
        &self,
        me: &str,
        f: &pb::Forward,
    ) -> Result<(Vec<f32>, usize, confide_crypto::sealed::ReplyKey), String> {
        let (secret, _) = self
            .secrets
            .get(&f.cloud_service)
            .ok_or_else(|| format!("{} is not one of this party's [cloud] services", f.cloud_service))?;
        let ephemeral: [u8; 32] =
            f.ephemeral.as_slice().try_into().map_err(|_| "an ephemeral key that is not 32 bytes".to_string())?;
        let ctx = context(&f.peer, me, &f.service, &f.cloud_service, f.request_id);
        let sealed = SealedRequest { ephemeral, ciphertext: f.ciphertext.clone() };
        let mut verifier =
            CertVerifier::with_revocations(&self.ca_pem, self.revocations.clone()).map_err(|e| e.to_string())?;
        verifier
            .add_peer(&f.peer, &f.certificate)
            .map_err(|e| format!("the request's certificate for {}: {e}", f.peer))?;
        verifier
            .verify(&f.peer, &request_transcript(&ctx, &sealed), &f.signature)
            .map_err(|e| format!("a request {} did not sign ({e})", f.peer))?;
        // Who sent it, then whether it may.
        if !self.accept_from.is_empty() && !self.accept_from.contains(&f.peer) {
            return Err(format!("{} is not in this party's [cloud] accept_from", f.peer));
        }
        let (plain, reply) = secret.open_request(&ctx, &sealed).map_err(|e| e.to_string())?;
        if plain.len() < 4 || !(plain.len() - 4).is_multiple_of(4) {
            return Err("a request that is not rows of f32".into());
        }
        let width = u32::from_le_bytes([plain[0], plain[1], plain[2], plain[3]]) as usize;
        let rows: Vec<f32> = plain[4..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        if width == 0 || !rows.len().is_multiple_of(width) || rows.iter().any(|v| !v.is_finite()) {
            return Err("a request whose rows are malformed".into());
        }
        Ok((rows, width, reply))
    }

    /// Cloud side: seals the answer for `f`.
    pub fn seal_answer(
        &self,
        me: &str,
        f: &pb::Forward,
        reply: confide_crypto::sealed::ReplyKey,
        classes: usize,
        probabilities: Vec<f32>,
        version: CloudVersion,
    ) -> Result<Vec<u8>, String> {
        let ctx = context(&f.peer, me, &f.service, &f.cloud_service, f.request_id);
        let bytes = serde_json::to_vec(&CloudAnswer { classes, probabilities, version }).map_err(|e| e.to_string())?;
        let sealed = reply.seal(&ctx, &bytes).map_err(|e| e.to_string())?;
        // The answer's other fields (the request id, the edge's name) are a
        // few hundred bytes at most: within the margin.
        let limit = self.forward_limit();
        if sealed.len() > limit {
            return Err(format!(
                "the answer would take {} bytes, above the {limit} the stream carries (limits.max_message_bytes \
                 here and at the coordinator, less {FORWARD_MARGIN_BYTES})",
                sealed.len(),
            ));
        }
        Ok(sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cloud key is made once, mode 0600, with no temporary file left,
    /// and read back as the same key; a key file others can read, or one a
    /// crash left short, is refused naming the file and what to do.
    #[test]
    fn a_cloud_key_is_made_once_privately_and_bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (made, at) = cloud_secret(dir.path(), "triage").unwrap();
        let path = dir.path().join("cloud-triage.key");
        assert_eq!(std::fs::read(&path).unwrap().len(), 40);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert_eq!(names, ["cloud-triage.key"], "a temporary file was left behind");
        let (again, at_again) = cloud_secret(dir.path(), "triage").unwrap();
        assert_eq!((again.public(), at_again), (made.public(), at));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = cloud_secret(dir.path(), "triage").err().unwrap();
            assert!(e.contains("cloud-triage.key") && e.contains("chmod 600"), "{e}");
        }
        // What a crash between creating and writing used to leave.
        let short = dir.path().join("cloud-short.key");
        write_private(&short, b"").unwrap();
        let e = cloud_secret(dir.path(), "short").err().unwrap();
        assert!(e.contains("cloud-short.key") && e.contains("0 bytes") && e.contains("move it away"), "{e}");
    }
}
