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

/// Domain separation of pipeline grants.
pub const GRANT_DOMAIN: &[u8] = b"confide-pipeline-grant-v1\0";

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
    /// Set when an incremental pipeline made this deployment (signed by the
    /// coordinator under the administrator's [`PipelineGrant`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineStep>,
}

/// What an automatic deployment says about the pipeline step that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineStep {
    /// The pipeline's job id.
    pub job: String,
    /// SHA-256 of the pipeline's spec as submitted (what the grant names).
    pub spec_sha256: String,
    /// The iteration.
    pub iteration: u32,
    /// Why: the gate's or the post-deployment check's figures.
    pub reason: String,
}

/// An administrator's permission, signed when the pipeline is submitted,
/// for the coordinator to deploy and roll back versions of one service on
/// the pipeline's behalf: only of `architecture`, with exactly `joint`,
/// for the pipeline whose spec hashes to `spec_sha256`, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineGrant {
    /// The service.
    pub service: String,
    /// SHA-256 of the pipeline's spec TOML, lowercase hex.
    pub spec_sha256: String,
    /// The `[model]` table every deployed version must have (TOML).
    pub architecture: String,
    /// The cloud tier every deployment keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joint: Option<JointConfig>,
    /// The service's newest deployment an administrator signed when this
    /// grant was (0: none; then the service's first deployment is the one
    /// the pipeline waits for). An administrator's deployment after it
    /// ends the grant: the pipeline must not undo it (put back another
    /// model or cloud tier). A grant signed before this field existed
    /// reads as 0.
    #[serde(default)]
    pub after_sequence: u64,
    /// When the administrator signed it (Unix seconds).
    pub issued_at: u64,
    /// No deployment under the grant is accepted after this (Unix seconds).
    pub expires_at: u64,
    /// The signing administrator.
    pub admin: String,
}

/// A grant with its signature.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedGrant {
    /// The parsed grant.
    pub grant: PipelineGrant,
    /// The architecture it names, parsed.
    pub model: ModelConfig,
    /// The grant's bytes exactly as signed.
    pub bytes: Vec<u8>,
    /// The administrator's signature.
    pub signature: Vec<u8>,
    /// The administrator's certificate, DER.
    pub admin_certificate: Vec<u8>,
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl PipelineGrant {
    /// Whether an administrator's deployment `sequence` came after this
    /// grant (which then no longer holds): any after `after_sequence`, but
    /// for the service's first when the grant was signed before it.
    pub fn superseded_by(&self, sequence: u64) -> bool {
        sequence > self.after_sequence.max(1)
    }

    /// Checks every field; errors name the field.
    pub fn validate(&self) -> Result<ModelConfig, String> {
        validate_service_name(&self.service).map_err(|e| format!("service: {e}"))?;
        if !is_sha256_hex(&self.spec_sha256) {
            return Err(format!("spec_sha256: {:?} is not 64 lowercase hex digits", self.spec_sha256));
        }
        if self.expires_at <= self.issued_at {
            return Err("expires_at: must be after issued_at".into());
        }
        if let Some(j) = &self.joint {
            j.validate()?;
        }
        toml::from_str(&self.architecture).map_err(|e| format!("architecture: {}", e.to_string().trim()))
    }
}

impl SignedGrant {
    /// Signs `grant` with an administrator's key.
    pub fn sign(grant: PipelineGrant, key: &impl IdentitySigner, admin_certificate: Vec<u8>) -> Result<Self, Error> {
        let model = grant.validate().map_err(|e| Error::InvalidInput(format!("pipeline grant: {e}")))?;
        let bytes = serde_json::to_vec(&grant).map_err(|e| Error::InvalidInput(format!("pipeline grant: {e}")))?;
        let signature = key
            .sign(&[GRANT_DOMAIN, &bytes].concat())
            .map_err(|e| Error::InvalidInput(format!("signing the pipeline grant: {e}")))?;
        Ok(SignedGrant { grant, model, bytes, signature, admin_certificate })
    }

    /// Verifies a grant from the wire against the federation CA.
    pub fn verify(msg: &pb::SignedGrant, ca_pem: &[u8], revocations: &Revocations) -> Result<Self, Error> {
        let grant: PipelineGrant = open_statement(
            ("pipeline grant", "pipeline grant"),
            GRANT_DOMAIN,
            Role::Admin,
            (&msg.grant, &msg.signature, &msg.admin_certificate),
            (ca_pem, revocations),
            |g: &PipelineGrant| g.admin.clone(),
        )?;
        let model = grant.validate().map_err(|e| Error::InvalidInput(format!("pipeline grant: {e}")))?;
        Ok(SignedGrant {
            grant,
            model,
            bytes: msg.grant.clone(),
            signature: msg.signature.clone(),
            admin_certificate: msg.admin_certificate.clone(),
        })
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::SignedGrant {
        pb::SignedGrant {
            grant: self.bytes.clone(),
            signature: self.signature.clone(),
            admin_certificate: self.admin_certificate.clone(),
        }
    }

    /// Whether `record`, signed by the coordinator, is one this grant
    /// allows: same service, architecture and cloud tier, made by the
    /// granted pipeline within the grant's validity.
    pub fn allows(&self, record: &DeploymentRecord, model: &ModelConfig) -> Result<(), String> {
        let g = &self.grant;
        let step = record.pipeline.as_ref().ok_or("the record names no pipeline step")?;
        if record.service != g.service {
            return Err(format!("the grant is for service {}, not {}", g.service, record.service));
        }
        if step.spec_sha256 != g.spec_sha256 {
            return Err("the record's pipeline is not the one the grant names".into());
        }
        if model != &self.model {
            return Err("the record's architecture is not the granted one".into());
        }
        if record.joint != g.joint {
            return Err("the record's cloud tier is not the granted one".into());
        }
        if record.issued_at < g.issued_at || record.issued_at > g.expires_at {
            return Err(format!(
                "issued at {} outside the grant's validity ({}..={})",
                record.issued_at, g.issued_at, g.expires_at
            ));
        }
        Ok(())
    }
}

/// SHA-256 of a pipeline's spec text, lowercase hex (what its grant names).
pub fn spec_sha256(spec_toml: &str) -> String {
    model_sha256(spec_toml.as_bytes())
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
        // Echoed bounded: the name can come from a peer, at any length.
        let shown: String = name.chars().take(64).collect();
        let more = if name.chars().nth(64).is_some() { "…" } else { "" };
        return Err(format!("{shown:?}{more} is not a service name (1 to 64 letters, digits, '-', '_')"));
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
    /// The administrator's certificate, DER (the coordinator's under a grant).
    pub admin_certificate: Vec<u8>,
    /// The grant an automatic deployment is made under.
    pub grant: Option<SignedGrant>,
}

/// Opens a signed JSON statement from the wire: at most
/// [`MAX_RECORD_BYTES`], signed over `domain ‖ bytes` by a certificate of
/// `role` that the CA issued and `revocations` does not revoke, parsed, and
/// naming its signer (`signer_named`). `what` and `signed` name it in errors.
fn open_statement<T: serde::de::DeserializeOwned>(
    (what, signed): (&str, &str),
    domain: &[u8],
    role: Role,
    (bytes, signature, certificate): (&[u8], &[u8], &[u8]),
    (ca_pem, revocations): (&[u8], &Revocations),
    signer_named: impl Fn(&T) -> String,
) -> Result<T, Error> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(Error::InvalidInput(format!("{what} of {} bytes (at most {MAX_RECORD_BYTES})", bytes.len())));
    }
    let signer = verify_statement(ca_pem, revocations, role, certificate, &[domain, bytes].concat(), signature)
        .map_err(|e| Error::InvalidInput(format!("{signed} signature: {e}")))?;
    let statement: T = serde_json::from_slice(bytes).map_err(|e| Error::InvalidInput(format!("{what}: {e}")))?;
    let named = signer_named(&statement);
    if named != signer.name {
        return Err(Error::InvalidInput(format!("{what}: admin {named:?} but signed by {:?}", signer.name)));
    }
    Ok(statement)
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
        if record.pipeline.is_some() {
            return Err(Error::InvalidInput("a pipeline's deployment is signed under its grant".into()));
        }
        Ok(SignedDeployment { record, model, bytes, signature, admin_certificate, grant: None })
    }

    /// Signs a pipeline's deployment with the coordinator's key under
    /// `grant`; `certificate` is the coordinator's (DER).
    pub fn sign_under_grant(
        record: DeploymentRecord,
        grant: SignedGrant,
        key: &impl IdentitySigner,
        certificate: Vec<u8>,
    ) -> Result<SignedDeployment, Error> {
        let model = record.validate().map_err(Error::InvalidInput)?;
        grant.allows(&record, &model).map_err(|e| Error::InvalidInput(format!("pipeline grant: {e}")))?;
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::InvalidInput(format!("deployment record: {e}")))?;
        let signature =
            key.sign(&transcript(&bytes)).map_err(|e| Error::InvalidInput(format!("signing the deployment: {e}")))?;
        Ok(SignedDeployment { record, model, bytes, signature, admin_certificate: certificate, grant: Some(grant) })
    }

    /// Verifies a deployment from the wire: an admin certificate of the
    /// federation CA that `revocations` does not revoke, its signature over
    /// the record, the record's fields, and that it names its signer.
    pub fn verify(
        msg: &pb::ServiceDeployment,
        ca_pem: &[u8],
        revocations: &Revocations,
    ) -> Result<SignedDeployment, Error> {
        // An administrator signs a deployment; the coordinator signs one only
        // under a grant an administrator signed.
        let grant = msg.grant.as_ref().map(|g| SignedGrant::verify(g, ca_pem, revocations)).transpose()?;
        let signer_role = if grant.is_some() { Role::Coordinator } else { Role::Admin };
        let record: DeploymentRecord = open_statement(
            ("deployment record", "deployment"),
            SIGNATURE_DOMAIN,
            signer_role,
            (&msg.record, &msg.signature, &msg.admin_certificate),
            (ca_pem, revocations),
            |r: &DeploymentRecord| r.admin.clone(),
        )?;
        let model = record.validate().map_err(|e| Error::InvalidInput(format!("deployment record: {e}")))?;
        match (&grant, &record.pipeline) {
            (Some(g), _) => {
                g.allows(&record, &model).map_err(|e| Error::InvalidInput(format!("pipeline grant: {e}")))?
            }
            (None, Some(_)) => {
                return Err(Error::InvalidInput("deployment record: a pipeline's deployment without its grant".into()));
            }
            (None, None) => {}
        }
        Ok(SignedDeployment {
            record,
            model,
            bytes: msg.record.clone(),
            signature: msg.signature.clone(),
            admin_certificate: msg.admin_certificate.clone(),
            grant,
        })
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::ServiceDeployment {
        pb::ServiceDeployment {
            record: self.bytes.clone(),
            signature: self.signature.clone(),
            admin_certificate: self.admin_certificate.clone(),
            grant: self.grant.as_ref().map(SignedGrant::to_pb),
        }
    }
}

/// The administrator's signing key, certificate (DER) and name, from a PKI
/// directory (`confide certs init` writes them there; keep them on the
/// administrator's machine).
pub fn admin_signer(
    pki: &confide_crypto::pki::PkiDir,
) -> Result<(confide_crypto::identity::IdentityKey, Vec<u8>, String), Error> {
    signer(&pki.admin_key(), &pki.admin_cert())
}

/// The coordinator's signing key, certificate (DER) and name: it signs a
/// pipeline's deployments under the administrator's grant.
pub fn coordinator_signer(
    pki: &confide_crypto::pki::PkiDir,
) -> Result<(confide_crypto::identity::IdentityKey, Vec<u8>, String), Error> {
    signer(&pki.coordinator_key(), &pki.coordinator_cert())
}

fn signer(
    key_path: &std::path::Path,
    cert_path: &std::path::Path,
) -> Result<(confide_crypto::identity::IdentityKey, Vec<u8>, String), Error> {
    let key_pem = confide_crypto::pki::read_private_key(key_path)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", key_path.display())))?;
    let key = confide_crypto::identity::IdentityKey::from_pem(&key_pem)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", key_path.display())))?;
    let der = crate::net::load_certs(cert_path)?.swap_remove(0).to_vec();
    let name = confide_crypto::pki::peer_identity(&der)
        .map_err(|e| Error::InvalidInput(format!("{}: {e}", cert_path.display())))?
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
        sequence: current
            .sequence
            .checked_add(1)
            .ok_or_else(|| format!("service {}: no sequence after {}", current.service, current.sequence))?,
        action: DeployAction::Rollback,
        job_id: target.job_id.clone(),
        round: target.round,
        sha256: target.sha256.clone(),
        architecture: target.architecture.clone(),
        rollback_to: target.rollback_to,
        issued_at: now,
        admin: admin.to_owned(),
        joint: target.joint.clone(),
        pipeline: None,
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
            pipeline: None,
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

    /// A grant holds until an administrator deploys after the deployment
    /// it was signed after; one signed before any waits for the first; one
    /// signed before the field existed reads as that.
    #[test]
    fn a_grant_is_superseded_by_a_later_administrators_deployment() {
        let g = |after_sequence| PipelineGrant { after_sequence, ..grant("triage", "s") };
        assert!(!g(0).superseded_by(1) && g(0).superseded_by(2));
        assert!(!g(3).superseded_by(3) && g(3).superseded_by(4));
        let mut old = serde_json::to_value(grant("triage", "s")).unwrap();
        old.as_object_mut().unwrap().remove("after_sequence");
        let read: PipelineGrant = serde_json::from_value(old).unwrap();
        assert_eq!(read.after_sequence, 0);
    }

    fn grant(service: &str, spec: &str) -> PipelineGrant {
        PipelineGrant {
            service: service.into(),
            spec_sha256: spec_sha256(spec),
            architecture: "kind = \"logistic_regression\"\nclasses = 2\n".into(),
            joint: None,
            after_sequence: 0,
            issued_at: 1,
            expires_at: 1000,
            admin: confide_crypto::pki::ADMIN_NAME.into(),
        }
    }

    fn pipeline_record(seq: u64, spec: &str) -> DeploymentRecord {
        let mut r = record(seq, 2, seq.checked_sub(1).filter(|&s| s > 0));
        r.admin = "confide-coordinator".into();
        r.issued_at = 10;
        r.pipeline = Some(PipelineStep {
            job: "p1".into(),
            spec_sha256: spec_sha256(spec),
            iteration: 1,
            reason: "gate".into(),
        });
        r
    }

    /// The coordinator deploys for a pipeline only within the
    /// administrator's grant: what it signs alone, or outside the grant
    /// (another service, pipeline, architecture, cloud tier or time), or
    /// under a grant a party signed, is refused.
    #[test]
    fn a_pipeline_deploys_only_within_the_administrators_grant() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t", &["a".into()], &["localhost".into()]).unwrap();
        let ca = std::fs::read(pki.ca_cert()).unwrap();
        let none = Revocations::empty();
        let (admin_key, admin_cert, _) = admin_signer(&pki).unwrap();
        let (coord_key, coord_cert, coord_name) = coordinator_signer(&pki).unwrap();
        let signed_grant = |g: PipelineGrant| SignedGrant::sign(g, &admin_key, admin_cert.clone()).unwrap();
        let ok = SignedDeployment::sign_under_grant(
            pipeline_record(2, "spec"),
            signed_grant(grant("triage", "spec")),
            &coord_key,
            coord_cert.clone(),
        )
        .unwrap();
        assert_eq!(coord_name, "confide-coordinator");
        let back = SignedDeployment::verify(&ok.to_pb(), &ca, &none).unwrap();
        assert_eq!(back.grant.unwrap().grant.service, "triage");
        // Without the grant, the coordinator's signature is not an admin's.
        let mut bare = ok.to_pb();
        bare.grant = None;
        let e = SignedDeployment::verify(&bare, &ca, &none).unwrap_err().to_string();
        assert!(e.contains("deployment signature"), "{e}");
        // The coordinator cannot sign a pipeline record as an administrator would.
        assert!(SignedDeployment::sign(pipeline_record(2, "spec"), &coord_key, coord_cert.clone()).is_err());
        // Outside the grant: each is refused by the party's verification.
        let forge = |r: DeploymentRecord, g: PipelineGrant| {
            let bytes = serde_json::to_vec(&r).unwrap();
            let signature = coord_key.sign(&transcript(&bytes)).unwrap();
            let msg = pb::ServiceDeployment {
                record: bytes,
                signature,
                admin_certificate: coord_cert.clone(),
                grant: Some(signed_grant(g).to_pb()),
            };
            SignedDeployment::verify(&msg, &ca, &none).unwrap_err().to_string()
        };
        let e = forge(pipeline_record(2, "spec"), grant("billing", "spec"));
        assert!(e.contains("for service billing"), "{e}");
        let e = forge(pipeline_record(2, "other spec"), grant("triage", "spec"));
        assert!(e.contains("not the one the grant names"), "{e}");
        let mut mlp = pipeline_record(2, "spec");
        mlp.architecture = "kind = \"mlp\"\nclasses = 2\nhidden = [4]\n".into();
        let e = forge(mlp, grant("triage", "spec"));
        assert!(e.contains("architecture"), "{e}");
        let mut late = pipeline_record(2, "spec");
        late.issued_at = 5000;
        let e = forge(late, grant("triage", "spec"));
        assert!(e.contains("outside the grant's validity"), "{e}");
        let mut cloud = pipeline_record(2, "spec");
        cloud.joint = Some(JointConfig {
            cloud: "a".into(),
            cloud_service: "big".into(),
            hard_examples: HardExampleRule::Confidence { threshold: 0.9 },
            timeout_ms: 100,
        });
        let e = forge(cloud, grant("triage", "spec"));
        assert!(e.contains("cloud tier"), "{e}");
        // A grant signed by a party is no grant.
        let party_key = IdentityKey::from_pem(&std::fs::read(pki.party_key("a")).unwrap()).unwrap();
        let party_cert = crate::net::load_certs(&pki.party_cert("a")).unwrap()[0].to_vec();
        let fake = SignedGrant::sign(grant("triage", "spec"), &party_key, party_cert).unwrap();
        let mut msg = ok.to_pb();
        msg.grant = Some(fake.to_pb());
        let e = SignedDeployment::verify(&msg, &ca, &none).unwrap_err().to_string();
        assert!(e.contains("pipeline grant signature"), "{e}");
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
