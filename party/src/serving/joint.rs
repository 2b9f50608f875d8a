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

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use confide_crypto::identity::{CertVerifier, IdentityKey, SharedRevocations};
use confide_crypto::sealed::{CloudSecret, SealedRequest, seal_request, verify_cloud_key};
use confide_proto::deploy::JointConfig;
use confide_proto::pb;
use serde::{Deserialize, Serialize};

use crate::audit::{AuditLog, ForwardedInput, rows_sha256};

/// A cloud party's verified key for one of its services.
#[derive(Debug, Clone)]
struct PeerKey {
    public: [u8; 32],
    /// SHA-256 of the certificate that signed it, hex (for the audit log).
    certificate_sha256: String,
}

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

/// What the cloud party seals back.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudAnswer {
    classes: usize,
    probabilities: Vec<f32>,
    version: CloudVersion,
}

/// The joint-inference state of a party: its policy, audit log and the
/// cloud keys it verified (edge side), and its own keys (cloud side).
pub struct Joint {
    share_inputs: BTreeMap<String, Vec<String>>,
    audit: Result<AuditLog, String>,
    ca_pem: Vec<u8>,
    revocations: SharedRevocations,
    peers: RwLock<HashMap<(String, String), PeerKey>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    /// `[cloud] services` and their key pairs.
    secrets: BTreeMap<String, CloudSecret>,
    identity: Option<IdentityKey>,
}

/// The additional authenticated data of one forwarded request.
pub fn context(edge: &str, cloud: &str, service: &str, cloud_service: &str, request_id: u64) -> Vec<u8> {
    format!("confide-joint-v1/{edge}/{cloud}/{service}/{cloud_service}/{request_id}").into_bytes()
}

fn sha256_hex(bytes: &[u8]) -> String {
    super::sha256_hex(bytes)
}

/// Loads (or makes, mode 0600) the key pair of cloud service `service` in `dir`.
fn cloud_secret(dir: &Path, service: &str) -> Result<CloudSecret, String> {
    let path = dir.join(format!("cloud-{service}.key"));
    match std::fs::read(&path) {
        Ok(bytes) => {
            let arr: [u8; 32] =
                bytes.as_slice().try_into().map_err(|_| format!("{}: not a 32-byte key", path.display()))?;
            Ok(CloudSecret::from_bytes(arr))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = CloudSecret::generate(&mut rand_core::OsRng);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            use std::io::Write;
            let mut f = opts.open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            f.write_all(secret.to_bytes().as_slice())
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(secret)
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
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
        let identity = if secrets.is_empty() {
            None
        } else {
            let pem = confide_crypto::pki::read_private_key(&config.key).map_err(|e| e.to_string())?;
            Some(IdentityKey::from_pem(&pem).map_err(|e| format!("{}: {e}", config.key.display()))?)
        };
        Ok(Joint {
            share_inputs: config.policy.share_inputs.clone(),
            // A log that cannot be opened stops forwarding, not serving.
            audit: AuditLog::open(&config.audit_log_path()),
            ca_pem,
            revocations,
            peers: RwLock::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            secrets,
            identity,
        })
    }

    /// This party's signed cloud keys, to announce on each connection.
    pub fn announcements(&self, me: &str) -> Vec<pb::CloudKey> {
        let Some(id) = &self.identity else { return Vec::new() };
        let now = crate::audit::unix_now_ms() / 1000;
        self.secrets
            .iter()
            .filter_map(|(service, s)| {
                let signature = s.sign(id, me, service, now).ok()?;
                Some(pb::CloudKey {
                    service: service.clone(),
                    public_key: s.public().to_vec(),
                    issued_at: now,
                    signature,
                })
            })
            .collect()
    }

    /// A cloud key the coordinator relayed: kept if its party's certificate
    /// is the CA's (not revoked) and that party signed it.
    pub fn on_cloud_key(&self, a: &pb::CloudKeyAnnouncement) -> Result<(), String> {
        let key = a.key.as_ref().ok_or("a cloud key announcement without a key")?;
        let public: [u8; 32] =
            key.public_key.as_slice().try_into().map_err(|_| "a cloud key that is not 32 bytes".to_string())?;
        let mut verifier =
            CertVerifier::with_revocations(&self.ca_pem, self.revocations.clone()).map_err(|e| e.to_string())?;
        verifier.add_peer(&a.party, &a.certificate).map_err(|e| format!("cloud key of {}: {e}", a.party))?;
        verify_cloud_key(&verifier, &a.party, &key.service, &public, key.issued_at, &key.signature)
            .map_err(|e| format!("cloud key of {} for {}: {e}", a.party, key.service))?;
        let peer = PeerKey { public, certificate_sha256: sha256_hex(&a.certificate) };
        self.peers.write().unwrap_or_else(|p| p.into_inner()).insert((a.party.clone(), key.service.clone()), peer);
        Ok(())
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
        let uplink = uplink.ok_or("not connected to the coordinator")?;
        let audit = self.audit.as_ref().map_err(|e| format!("the audit log is not writable ({e})"))?;
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ctx = context(me, &j.cloud, service, &j.cloud_service, request_id);
        let mut plain = Vec::with_capacity(4 + rows.len() * 4);
        plain.extend_from_slice(&(width as u32).to_le_bytes());
        for v in rows {
            plain.extend_from_slice(&v.to_le_bytes());
        }
        let (sealed, reply_key) =
            seal_request(&peer.public, &ctx, &plain, &mut rand_core::OsRng).map_err(|e| e.to_string())?;
        // Logged and synced before it leaves.
        audit.record(&ForwardedInput {
            time_ms: crate::audit::unix_now_ms(),
            service: service.to_owned(),
            input_sha256: rows_sha256(rows),
            rows: rows.len() / width.max(1),
            destination: j.cloud.clone(),
            destination_certificate_sha256: peer.certificate_sha256.clone(),
            request_id,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request_id, Pending { cloud: j.cloud.clone(), reply: tx });
        let msg = pb::Forward {
            request_id,
            peer: j.cloud.clone(),
            service: service.to_owned(),
            cloud_service: j.cloud_service.clone(),
            ephemeral: sealed.ephemeral.to_vec(),
            ciphertext: sealed.ciphertext,
        };
        let outcome = async {
            uplink
                .send(pb::PartyMessage { body: Some(pb::party_message::Body::Forward(msg)) })
                .await
                .map_err(|_| "the coordinator stream closed".to_string())?;
            match tokio::time::timeout(std::time::Duration::from_millis(j.timeout_ms), rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("the request was dropped".into()),
                Err(_) => Err(format!("no answer from {} within {} ms", j.cloud, j.timeout_ms)),
            }
        }
        .await;
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&request_id);
        let ciphertext = outcome?;
        let answer = reply_key.open(&ctx, &ciphertext).map_err(|e| format!("the cloud's answer: {e}"))?;
        let answer: CloudAnswer =
            serde_json::from_slice(&answer).map_err(|e| format!("the cloud's answer is not one: {e}"))?;
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
        Ok((answer.probabilities, answer.version))
    }

    /// An answer (or the coordinator's refusal) for a pending request.
    pub fn on_answer(&self, a: pb::ForwardAnswer) -> Result<(), String> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = pending.get(&a.request_id) else { return Ok(()) };
        if p.cloud != a.peer {
            return Err(format!("an answer to request {} from {}, not from {}", a.request_id, a.peer, p.cloud));
        }
        let Some(p) = pending.remove(&a.request_id) else { return Ok(()) };
        let r = if a.error.is_empty() { Ok(a.ciphertext) } else { Err(a.error) };
        let _ = p.reply.send(r);
        Ok(())
    }

    /// Drops every pending request (the stream closed): they fall back now.
    pub fn disconnected(&self) {
        for (_, p) in self.pending.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            let _ = p.reply.send(Err("the coordinator stream closed".into()));
        }
    }

    /// Cloud side: opens a forwarded request for one of this party's cloud
    /// services; returns the rows, their width and the key for the answer.
    pub fn open_request(
        &self,
        me: &str,
        f: &pb::Forward,
    ) -> Result<(Vec<f32>, usize, confide_crypto::sealed::ReplyKey), String> {
        let secret = self
            .secrets
            .get(&f.cloud_service)
            .ok_or_else(|| format!("{} is not one of this party's [cloud] services", f.cloud_service))?;
        let ephemeral: [u8; 32] =
            f.ephemeral.as_slice().try_into().map_err(|_| "an ephemeral key that is not 32 bytes".to_string())?;
        let ctx = context(&f.peer, me, &f.service, &f.cloud_service, f.request_id);
        let sealed = SealedRequest { ephemeral, ciphertext: f.ciphertext.clone() };
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
        me: &str,
        f: &pb::Forward,
        reply: confide_crypto::sealed::ReplyKey,
        classes: usize,
        probabilities: Vec<f32>,
        version: CloudVersion,
    ) -> Result<Vec<u8>, String> {
        let ctx = context(&f.peer, me, &f.service, &f.cloud_service, f.request_id);
        let bytes = serde_json::to_vec(&CloudAnswer { classes, probabilities, version }).map_err(|e| e.to_string())?;
        reply.seal(&ctx, &bytes).map_err(|e| e.to_string())
    }
}
