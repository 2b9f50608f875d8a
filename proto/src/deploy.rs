//! Service deployments: an administrator's signed statement binding a model
//! version to a named service.
//!
//! The coordinator stores and relays deployments but cannot make one: the
//! record is signed with an admin certificate's key (held by the
//! administrator's CLI, not the coordinator), and a party verifies it
//! against the federation CA before pulling the model. It then checks the
//! model's bytes against the signed SHA-256 and its tensors against the
//! signed architecture. Each service's deployments carry a sequence number
//! that only grows, so a coordinator cannot replay an older deployment (a
//! rollback is a new, signed deployment of an older version).

use serde::{Deserialize, Serialize};

use confide_algorithms::ModelConfig;
use confide_algorithms::hard_examples::HardExampleRule;
use confide_crypto::identity::verify_statement;
use confide_crypto::pki::Role;
use confide_crypto::revocation::Revocations;
use confide_crypto::secagg::protocol::IdentitySigner;

use crate::{Error, pb};

/// Domain separation of deployment signatures.
pub const SIGNATURE_DOMAIN: &[u8] = b"confide-deployment-v1\0";

/// Largest encoded record accepted (the architecture is a small table).
pub const MAX_RECORD_BYTES: usize = 16 << 10;

/// What a deployment does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeployAction {
    /// `confide model deploy`: a chosen version.
    Deploy,
    /// `confide model rollback`: the version before the current one.
    Rollback,
}

impl DeployAction {
    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            DeployAction::Deploy => "deploy",
            DeployAction::Rollback => "rollback",
        }
    }
}

/// Joint inference: the cloud tier of an edge service. Signed with the
/// deployment, so the coordinator cannot send a service's hard examples to
/// another party (and the edge's `policy.share_inputs` must allow this one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JointConfig {
    /// The cloud party.
    pub cloud: String,
    /// Its service that answers hard examples (one of its `[cloud] services`).
    pub cloud_service: String,
    /// Which edge answers are hard.
    pub hard_examples: HardExampleRule,
    /// How long the edge waits for the cloud before it answers itself (flagged).
    pub timeout_ms: u64,
}

impl JointConfig {
    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<(), String> {
        confide_crypto::pki::validate_party_name(&self.cloud).map_err(|e| format!("joint.cloud: {e}"))?;
        validate_service_name(&self.cloud_service).map_err(|e| format!("joint.cloud_service: {e}"))?;
        self.hard_examples.validate().map_err(|e| format!("joint.hard_examples.{e}"))?;
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err(format!("joint.timeout_ms: must be 1..=60000 (got {})", self.timeout_ms));
        }
        Ok(())
    }
}

/// The signed body of a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRecord {
    /// The service's name.
    pub service: String,
    /// 1 for a service's first deployment, then one more each time.
    pub sequence: u64,
    /// Deploy or roll back.
    pub action: DeployAction,
    /// The job whose model this is.
    pub job_id: String,
    /// The round it is the global model after (0: the initial model).
    pub round: u32,
    /// SHA-256 of the model's safetensors file, lowercase hex.
    pub sha256: String,
    /// The job's `[model]` table (TOML): the architecture the tensors are for.
    pub architecture: String,
    /// The deployment a rollback of this one returns to (its sequence), if any.
    pub rollback_to: Option<u64>,
    /// When the administrator signed it (Unix seconds).
    pub issued_at: u64,
    /// The signing administrator (the name in their certificate).
    pub admin: String,
    /// The cloud tier, for joint inference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joint: Option<JointConfig>,
}

/// A model version's digest: SHA-256 of its safetensors bytes, lowercase
/// hex. The coordinator records it with each checkpoint, the administrator
/// signs it, and a party checks pulled bytes against it.
pub fn model_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a service name: what `[serve] services` and URLs carry.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || name.starts_with('-')
    {
        return Err(format!("{name:?} is not a service name (1 to 64 letters, digits, '-', '_')"));
    }
    Ok(())
}

impl DeploymentRecord {
    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<ModelConfig, String> {
        validate_service_name(&self.service).map_err(|e| format!("service: {e}"))?;
        if self.sequence == 0 {
            return Err("sequence: starts at 1".into());
        }
        if self.job_id.is_empty() || self.job_id.len() > 64 {
            return Err("job_id: 1 to 64 characters".into());
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("sha256: {:?} is not 64 lowercase hex digits", self.sha256));
        }
        if self.rollback_to.is_some_and(|p| p >= self.sequence) {
            return Err("rollback_to: must name an earlier deployment".into());
        }
        if let Some(j) = &self.joint {
            j.validate()?;
        }
        let model: ModelConfig =
            toml::from_str(&self.architecture).map_err(|e| format!("architecture: {}", e.to_string().trim()))?;
        Ok(model)
    }

    /// Whether two records name the same model version.
    pub fn same_version(&self, other: &DeploymentRecord) -> bool {
        self.job_id == other.job_id && self.round == other.round && self.sha256 == other.sha256
    }
}

/// A deployment with its signature, as verified or as made.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedDeployment {
    /// The parsed record.
    pub record: DeploymentRecord,
    /// The model architecture the record names, parsed.
    pub model: ModelConfig,
    /// The record's bytes exactly as signed.
    pub bytes: Vec<u8>,
    /// The administrator's signature.
    pub signature: Vec<u8>,
    /// The administrator's certificate, DER.
    pub admin_certificate: Vec<u8>,
}

fn transcript(bytes: &[u8]) -> Vec<u8> {
    [SIGNATURE_DOMAIN, bytes].concat()
}

impl SignedDeployment {
    /// Signs `record` with an administrator's key; `admin_certificate` is
    /// the certificate of that key (DER).
    pub fn sign(
        record: DeploymentRecord,
        key: &impl IdentitySigner,
        admin_certificate: Vec<u8>,
    ) -> Result<SignedDeployment, Error> {
        let model = record.validate().map_err(Error::InvalidInput)?;
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::InvalidInput(format!("deployment record: {e}")))?;
        let signature =
            key.sign(&transcript(&bytes)).map_err(|e| Error::InvalidInput(format!("signing the deployment: {e}")))?;
        Ok(SignedDeployment { record, model, bytes, signature, admin_certificate })
    }

    /// Verifies a deployment from the wire: an admin certificate of the
    /// federation CA that `revocations` does not revoke, its signature over
    /// the record, the record's fields, and that it names its signer.
    pub fn verify(
        msg: &pb::ServiceDeployment,
        ca_pem: &[u8],
        revocations: &Revocations,
    ) -> Result<SignedDeployment, Error> {
        if msg.record.len() > MAX_RECORD_BYTES {
            return Err(Error::InvalidInput(format!(
                "deployment record of {} bytes (at most {MAX_RECORD_BYTES})",
                msg.record.len()
            )));
        }
        let admin = verify_statement(
            ca_pem,
            revocations,
            Role::Admin,
            &msg.admin_certificate,
            &transcript(&msg.record),
            &msg.signature,
        )
        .map_err(|e| Error::InvalidInput(format!("deployment signature: {e}")))?;
        let record: DeploymentRecord =
            serde_json::from_slice(&msg.record).map_err(|e| Error::InvalidInput(format!("deployment record: {e}")))?;
        let model = record.validate().map_err(|e| Error::InvalidInput(format!("deployment record: {e}")))?;
        if record.admin != admin.name {
            return Err(Error::InvalidInput(format!(
                "deployment record: admin {:?} but signed by {:?}",
                record.admin, admin.name
            )));
        }
        Ok(SignedDeployment {
            record,
            model,
            bytes: msg.record.clone(),
            signature: msg.signature.clone(),
            admin_certificate: msg.admin_certificate.clone(),
        })
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::ServiceDeployment {
        pb::ServiceDeployment {
            record: self.bytes.clone(),
            signature: self.signature.clone(),
            admin_certificate: self.admin_certificate.clone(),
        }
    }
}

/// The administrator's signing key, certificate (DER) and name, from a PKI
/// directory (`confide certs init` writes them there; keep them on the
/// administrator's machine).
pub fn admin_signer(
    pki: &confide_crypto::pki::PkiDir,
) -> Result<(confide_crypto::identity::IdentityKey, Vec<u8>, String), Error> {
    let key_pem = confide_crypto::pki::read_private_key(&pki.admin_key())
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", pki.admin_key().display())))?;
    let key = confide_crypto::identity::IdentityKey::from_pem(&key_pem)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", pki.admin_key().display())))?;
    let der = crate::net::load_certs(&pki.admin_cert())?.swap_remove(0).to_vec();
    let name = confide_crypto::pki::peer_identity(&der)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", pki.admin_cert().display())))?
        .name;
    Ok((key, der, name))
}

/// The record a rollback of `current` signs: the version `current` replaced,
/// with the next sequence. `history` is the service's deployments.
pub fn rollback_record(
    current: &DeploymentRecord,
    history: &[DeploymentRecord],
    admin: &str,
    now: u64,
) -> Result<DeploymentRecord, String> {
    let target_seq = current.rollback_to.ok_or_else(|| {
        format!("service {}: deployment {} has no earlier version to roll back to", current.service, current.sequence)
    })?;
    let target = history
        .iter()
        .find(|r| r.sequence == target_seq)
        .ok_or_else(|| format!("service {}: deployment {target_seq} is missing from the history", current.service))?;
    Ok(DeploymentRecord {
        service: current.service.clone(),
        sequence: current.sequence + 1,
        action: DeployAction::Rollback,
        job_id: target.job_id.clone(),
        round: target.round,
        sha256: target.sha256.clone(),
        architecture: target.architecture.clone(),
        rollback_to: target.rollback_to,
        issued_at: now,
        admin: admin.to_owned(),
        joint: target.joint.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_crypto::identity::IdentityKey;
    use confide_crypto::pki::PkiDir;

    pub(crate) fn record(seq: u64, round: u32, rollback_to: Option<u64>) -> DeploymentRecord {
        DeploymentRecord {
            service: "triage".into(),
            sequence: seq,
            action: DeployAction::Deploy,
            job_id: "job-1".into(),
            round,
            sha256: format!("{round:064x}"),
            architecture: "kind = \"logistic_regression\"\nclasses = 2\n".into(),
            rollback_to,
            issued_at: 1,
            admin: confide_crypto::pki::ADMIN_NAME.into(),
            joint: None,
        }
    }

    #[test]
    fn a_deployment_verifies_only_as_the_administrator_signed_it() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into()], &[]).unwrap();
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        let (key, cert, name) = admin_signer(&pki).unwrap();
        assert_eq!(name, confide_crypto::pki::ADMIN_NAME);
        let none = Revocations::empty();
        let signed = SignedDeployment::sign(record(1, 2, None), &key, cert.clone()).unwrap();
        let back = SignedDeployment::verify(&signed.to_pb(), &ca, &none).unwrap();
        assert_eq!(back.record, signed.record);
        // The coordinator edits the record (another round, another hash).
        let mut msg = signed.to_pb();
        msg.record = serde_json::to_vec(&record(1, 3, None)).unwrap();
        let e = SignedDeployment::verify(&msg, &ca, &none).unwrap_err().to_string();
        assert!(e.contains("does not verify"), "{e}");
        // A party signs one with its own certificate.
        let party_key = IdentityKey::from_pem(&std::fs::read(pki.party_key("a")).unwrap()).unwrap();
        let party_cert = crate::net::load_certs(&pki.party_cert("a")).unwrap()[0].to_vec();
        let forged = SignedDeployment::sign(record(1, 2, None), &party_key, party_cert).unwrap();
        let e = SignedDeployment::verify(&forged.to_pb(), &ca, &none).unwrap_err().to_string();
        assert!(e.contains("Party certificate a"), "{e}");
        // A record naming another administrator than its signer.
        let mut r = record(1, 2, None);
        r.admin = "someone".into();
        let e = SignedDeployment::verify(&SignedDeployment::sign(r, &key, cert).unwrap().to_pb(), &ca, &none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("signed by \"confide-admin\""), "{e}");
    }

    #[test]
    fn records_are_validated_field_by_field() {
        let mut r = record(1, 2, None);
        r.service = "a b".into();
        assert!(r.validate().unwrap_err().starts_with("service:"));
        let mut r = record(0, 2, None);
        assert!(r.validate().unwrap_err().starts_with("sequence:"));
        r = record(2, 2, Some(2));
        assert!(r.validate().unwrap_err().starts_with("rollback_to:"));
        r = record(1, 2, None);
        r.sha256 = "ABC".into();
        assert!(r.validate().unwrap_err().starts_with("sha256:"));
        r = record(1, 2, None);
        r.architecture = "kind = \"mlp\"\nclasses = 1\n".into();
        assert!(r.validate().unwrap_err().starts_with("architecture:"));
        let joint = |timeout_ms, threshold| JointConfig {
            cloud: "cloud-0".into(),
            cloud_service: "bc-cloud".into(),
            hard_examples: HardExampleRule::Margin { threshold },
            timeout_ms,
        };
        r = record(1, 2, None);
        r.joint = Some(joint(500, 0.2));
        r.validate().unwrap();
        r.joint = Some(joint(0, 0.2));
        assert!(r.validate().unwrap_err().starts_with("joint.timeout_ms:"));
        r.joint = Some(joint(500, 2.0));
        assert!(r.validate().unwrap_err().starts_with("joint.hard_examples.threshold:"));
    }

    #[test]
    fn rollbacks_walk_back_through_the_history_and_stop_at_the_first() {
        let a = record(1, 1, None);
        let b = record(2, 2, Some(1));
        let c = record(3, 3, Some(2));
        let history = vec![a.clone(), b.clone(), c.clone()];
        let r1 = rollback_record(&c, &history, "admin", 9).unwrap();
        assert!(r1.same_version(&b) && r1.sequence == 4 && r1.rollback_to == Some(1));
        assert_eq!(r1.action, DeployAction::Rollback);
        let history = [history, vec![r1.clone()]].concat();
        let r2 = rollback_record(&r1, &history, "admin", 9).unwrap();
        assert!(r2.same_version(&a) && r2.sequence == 5 && r2.rollback_to.is_none());
        assert!(rollback_record(&r2, &history, "admin", 9).unwrap_err().contains("no earlier version"));
    }
}
