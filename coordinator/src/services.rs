//! Services: model versions bound to names by administrators' signed
//! deployments, pushed to the parties and pulled by those that serve them.
//!
//! The coordinator checks a deployment before storing it (an admin signed
//! it, it is the service's next, it names a kept version with that hash
//! and the job's architecture, a rollback returns to the version it
//! should), but parties do not rely on that: each verifies the signature,
//! the sequence, the hash and the architecture itself
//! (`confide_party::serving`).

use confide_algorithms::ModelConfig;
use confide_proto::deploy::{DeployAction, DeploymentRecord, SignedDeployment, rollback_record};
use confide_proto::jobspec::JobSpec;
use confide_proto::pb;

use crate::Error;
use crate::db::{Db, StoredDeployment, unix_now};
use crate::server::Hub;

fn to_pb(d: &StoredDeployment) -> pb::ServiceDeployment {
    pb::ServiceDeployment {
        record: d.record.clone(),
        signature: d.signature.clone(),
        admin_certificate: d.admin_certificate.clone(),
        grant: d.grant.as_deref().and_then(|g| prost::Message::decode(g).ok()),
    }
}

/// Every service's current (newest) deployment, as parties receive them.
pub fn current_deployments(db: &Db) -> Result<Vec<pb::ServiceDeployment>, Error> {
    let mut out: Vec<pb::ServiceDeployment> = Vec::new();
    let mut last = None;
    for d in db.deployments(None)? {
        if last.as_deref() != Some(d.service.as_str()) {
            out.push(to_pb(&d));
            last = Some(d.service.clone());
        }
    }
    Ok(out)
}

/// Services with their histories (newest first), one or all.
pub fn statuses(db: &Db, service: Option<&str>) -> Result<Vec<pb::ServiceStatus>, Error> {
    let mut out: Vec<pb::ServiceStatus> = Vec::new();
    let shown = if service.is_some() { SHOWN_OF_ONE } else { SHOWN_OF_EACH };
    let deployments = db.deployments(service)?;
    for group in deployments.chunk_by(|a, b| a.service == b.service) {
        let (Some(current), Some(oldest)) = (group.first(), group.last()) else { continue };
        let mut kept: Vec<pb::ServiceDeployment> = group.iter().take(shown).map(to_pb).collect();
        // What a rollback returns to, wherever it is in the history (the
        // CLI signs the rollback over it).
        let target = serde_json::from_slice::<DeploymentRecord>(&current.record).ok().and_then(|r| r.rollback_to);
        if let Some(t) = target
            && let Some(d) = group.iter().skip(shown).find(|d| d.sequence == t)
        {
            kept.push(to_pb(d));
        }
        out.push(pb::ServiceStatus {
            service: current.service.clone(),
            deployments: kept,
            created_at: oldest.created_at,
            // Filled by the admin API from the parties' reports.
            serving: None,
            serving_parties: Vec::new(),
            deployments_total: group.len() as u64,
        });
    }
    Ok(out)
}

/// Deployments listed when one service is asked for (see
/// `ServiceStatus.deployments`).
pub const SHOWN_OF_ONE: usize = 64;

/// Deployments listed per service when all are.
pub const SHOWN_OF_EACH: usize = 8;

/// The `[model]` table of a job, as deployments carry it: read on its own,
/// so that a stored spec a later build refuses elsewhere (a tightened
/// `[dp]` check) still lists and deploys its models.
pub fn architecture_of(db: &Db, job: &str, limits: &confide_proto::Limits) -> Result<ModelConfig, Error> {
    let toml = db.spec_toml(job)?.ok_or_else(|| Error::NotFound(format!("job {job}")))?;
    Ok(JobSpec::stored_model(&toml, &format!("spec of job {job}"), limits)?)
}

/// The records of a service's history, newest first, as stored.
fn history(db: &Db, service: &str) -> Result<Vec<DeploymentRecord>, Error> {
    db.deployments(Some(service))?
        .iter()
        .map(|d| {
            serde_json::from_slice(&d.record).map_err(|e| {
                Error::Storage(format!("service {service}: stored deployment {} is unreadable: {e}", d.sequence))
            })
        })
        .collect()
}

/// Checks and stores a deployment the administrator holding
/// `caller_certificate` signed; returns the service's new status. The
/// caller then pushes it to the parties.
pub fn deploy(hub: &Hub, msg: &pb::ServiceDeployment, caller_certificate: &[u8]) -> Result<pb::ServiceStatus, Error> {
    let ca = std::fs::read(hub.pki().ca_cert()).map_err(|e| Error::io(&hub.pki().ca_cert(), e))?;
    let signed =
        SignedDeployment::verify(msg, &ca, &hub.revocation_list()).map_err(|e| Error::Refused(e.to_string()))?;
    if signed.admin_certificate != caller_certificate {
        return Err(Error::Refused("the deployment is signed with another certificate than the caller's".into()));
    }
    if signed.grant.is_some() {
        return Err(Error::Refused("only a pipeline deploys under a grant".into()));
    }
    store(hub, &signed)
}

/// Signs a pipeline's deployment (or rollback) with the coordinator's key
/// under the administrator's grant, checks and stores it like any other.
pub fn deploy_by_pipeline(
    hub: &Hub,
    record: DeploymentRecord,
    grant: confide_proto::deploy::SignedGrant,
) -> Result<(pb::ServiceStatus, pb::ServiceDeployment), Error> {
    // An administrator may have deployed while the iteration ran: not
    // undone (the store then refuses a deployment that is not the next).
    grant_still_holds(hub.db(), &record.service, &grant.grant)?;
    let (key, cert, _) =
        confide_proto::deploy::coordinator_signer(hub.pki()).map_err(|e| Error::InvalidInput(e.to_string()))?;
    let signed =
        SignedDeployment::sign_under_grant(record, grant, &key, cert).map_err(|e| Error::Refused(e.to_string()))?;
    let status = store(hub, &signed)?;
    Ok((status, signed.to_pb()))
}

/// The service's history, newest first, and the record a pipeline's next
/// deployment of `job_id` after `round` would carry (all but its pipeline step).
pub fn next_record(
    hub: &Hub,
    service: &str,
    job_id: &str,
    round: u32,
    signer: &str,
    grant: &confide_proto::deploy::PipelineGrant,
) -> Result<DeploymentRecord, Error> {
    let version = hub
        .db()
        .model_version(job_id, round)?
        .ok_or_else(|| Error::NotFound(format!("job {job_id} has no kept model version after round {round}")))?;
    let current = history(hub.db(), service)?.into_iter().next();
    Ok(DeploymentRecord {
        service: service.to_owned(),
        sequence: match &current {
            None => 1,
            Some(c) => c
                .sequence
                .checked_add(1)
                .ok_or_else(|| Error::InvalidInput(format!("service {service}: no sequence after {}", c.sequence)))?,
        },
        action: DeployAction::Deploy,
        job_id: job_id.to_owned(),
        round,
        sha256: version.sha256,
        architecture: grant.architecture.clone(),
        rollback_to: current.map(|c| c.sequence),
        issued_at: unix_now(),
        admin: signer.to_owned(),
        joint: grant.joint.clone(),
        pipeline: None,
    })
}

/// The record a pipeline's rollback of `service` would carry (all but its
/// pipeline step), and the version it returns to.
pub fn rollback_for_pipeline(hub: &Hub, service: &str, signer: &str) -> Result<DeploymentRecord, Error> {
    let history = history(hub.db(), service)?;
    let current = history.first().ok_or_else(|| Error::NotFound(format!("service {service} has no deployment")))?;
    rollback_record(current, &history, signer, unix_now()).map_err(Error::Refused)
}

/// The service's current deployment record, if any.
pub fn current_record(db: &Db, service: &str) -> Result<Option<DeploymentRecord>, Error> {
    Ok(history(db, service)?.into_iter().next())
}

/// Refuses `grant` once an administrator has deployed `service` after it
/// was signed (not a pipeline under a grant): the grant does not undo
/// that deployment, and parties refuse its deployments.
pub fn grant_still_holds(db: &Db, service: &str, grant: &confide_proto::deploy::PipelineGrant) -> Result<(), Error> {
    let history = history(db, service)?;
    match history.into_iter().find(|r| r.pipeline.is_none() && grant.superseded_by(r.sequence)) {
        None => Ok(()),
        Some(r) => Err(Error::Refused(format!(
            "an administrator deployed {} of service {service} after the grant (signed after deployment {}): \
             submit the pipeline again, to sign the grant again",
            r.sequence, grant.after_sequence
        ))),
    }
}

/// The record the service's current deployment replaced, if any.
pub fn previous_record(db: &Db, service: &str) -> Result<Option<DeploymentRecord>, Error> {
    let history = history(db, service)?;
    let Some(prev) = history.first().and_then(|c| c.rollback_to) else { return Ok(None) };
    Ok(history.into_iter().find(|r| r.sequence == prev))
}

fn store(hub: &Hub, signed: &SignedDeployment) -> Result<pb::ServiceStatus, Error> {
    let r = &signed.record;
    let db = hub.db();
    let version = db.model_version(&r.job_id, r.round)?.ok_or_else(|| {
        Error::NotFound(format!("job {} has no kept model version after round {}", r.job_id, r.round))
    })?;
    if version.sha256 != r.sha256 {
        return Err(Error::Refused(format!(
            "the record's sha256 {} is not that of job {} round {} ({})",
            r.sha256, r.job_id, r.round, version.sha256
        )));
    }
    let architecture = architecture_of(db, &r.job_id, hub.limits())?;
    if architecture != signed.model {
        return Err(Error::Refused(format!("the record's architecture is not job {}'s [model] table", r.job_id)));
    }
    let history = history(db, &r.service)?;
    let current = history.first();
    match (r.action, current) {
        (DeployAction::Deploy, _) => {
            let expected = current.map(|c| c.sequence);
            if r.rollback_to != expected {
                return Err(Error::Refused(format!(
                    "service {}: a deployment must roll back to the current one ({expected:?}), not {:?}",
                    r.service, r.rollback_to
                )));
            }
        }
        (DeployAction::Rollback, None) => {
            return Err(Error::Refused(format!("service {} has nothing deployed to roll back", r.service)));
        }
        (DeployAction::Rollback, Some(c)) => {
            let mut expected = rollback_record(c, &history, &r.admin, r.issued_at).map_err(Error::Refused)?;
            expected.pipeline = r.pipeline.clone();
            if &expected != r {
                return Err(Error::Refused(format!(
                    "service {}: a rollback from deployment {} returns to job {} round {} as deployment {}",
                    r.service, c.sequence, expected.job_id, expected.round, expected.sequence
                )));
            }
        }
    }
    let stored = StoredDeployment {
        service: r.service.clone(),
        sequence: r.sequence,
        record: signed.bytes.clone(),
        signature: signed.signature.clone(),
        admin_certificate: signed.admin_certificate.clone(),
        grant: signed.grant.as_ref().map(|g| prost::Message::encode_to_vec(&g.to_pb())),
        created_at: unix_now(),
    };
    db.add_deployment(&stored, &r.job_id, r.round)?;
    tracing::info!(
        service = %r.service, sequence = r.sequence, job = %r.job_id, round = r.round,
        action = r.action.as_str(), "deployed"
    );
    statuses(db, Some(&r.service))?
        .pop()
        .ok_or_else(|| Error::Storage(format!("service {} vanished after its deployment", r.service)))
}

/// The cloud tier of `service`'s current deployment, if it has one.
pub fn joint_route(db: &Db, service: &str) -> Result<Option<confide_proto::deploy::JointConfig>, Error> {
    Ok(history(db, service)?.into_iter().next().and_then(|r| r.joint))
}

/// The model bytes of deployment `sequence` of `service`, for `party`,
/// which pulls it; the error is what the party is told.
///
/// Only to a party whose data may be in the model ([`Db::took_part`]: it
/// accepted the job, took part in a round up to the deployed one, or took
/// part in a round, up to the start, of a job the model started from): every party hears of every
/// deployment, and without this any enrolled party could take a model it
/// did not help train, such as a joint service's cloud model that
/// `[cloud] accept_from` keeps it from querying (found by review). Round 0
/// is no exception: its standardisation can be setup's feature statistics.
pub fn model_for_pull(db: &Db, party: &str, service: &str, sequence: u64) -> Result<Vec<u8>, String> {
    let history = history(db, service).map_err(|e| e.to_string())?;
    // The current deployment only: a rolled-back or superseded model is
    // no party's to serve (review finding: any party could pull any).
    let r = history
        .first()
        .filter(|r| r.sequence == sequence)
        .ok_or_else(|| format!("service {service} has no current deployment {sequence}"))?;
    if !db.took_part(&r.job_id, party, r.round).map_err(|e| e.to_string())? {
        return Err(format!(
            "party {party} took no part in job {} up to round {} (nor in the rounds of a job it started from), \
             whose model deployment {sequence} of service {service} is: it is not this party's to pull",
            r.job_id, r.round
        ));
    }
    let v = db
        .model_version(&r.job_id, r.round)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the model of job {} round {} is gone", r.job_id, r.round))?;
    std::fs::read(&v.path).map_err(|e| format!("reading the model of job {} round {}: {e}", r.job_id, r.round))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::SavedModel;
    use confide_proto::Limits;
    use confide_proto::status::{PartyState, PartyStatus};

    /// A pipeline's history grows without end, but a listing fits a
    /// message: the newest 64 of one service (8 of each when all are
    /// listed), then what the current deployment rolls back to, and the
    /// total.
    #[test]
    fn a_long_history_is_listed_newest_first_with_its_rollback_target() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("c.db")).unwrap();
        let spec = "name = \"t\"\nkind = \"train\"\nrounds = 2\n[parties]\nnames = [\"a\"]\ndataset = \"d\"\n\
                    [model]\nkind = \"logistic_regression\"\nclasses = 2\n";
        db.insert_job("j1", &JobSpec::parse(spec, "t", &Limits::default()).unwrap(), None).unwrap();
        let model = SavedModel { path: "/m/round-1".into(), sha256: format!("{:064x}", 1), bytes: 1 };
        db.save_checkpoint("j1", 1, Some(&model), None, None).unwrap();
        let total = 100u64;
        for seq in 1..=total {
            let record = DeploymentRecord {
                service: "triage".into(),
                sequence: seq,
                action: if seq == total { DeployAction::Rollback } else { DeployAction::Deploy },
                job_id: "j1".into(),
                round: 1,
                sha256: format!("{:064x}", 1),
                architecture: "kind = \"logistic_regression\"\nclasses = 2\n".into(),
                rollback_to: (seq > 1).then(|| if seq == total { 3 } else { seq - 1 }),
                issued_at: seq,
                admin: "admin".into(),
                joint: None,
                pipeline: None,
            };
            let stored = StoredDeployment {
                service: "triage".into(),
                sequence: seq,
                record: serde_json::to_vec(&record).unwrap(),
                signature: vec![2],
                admin_certificate: vec![3],
                grant: None,
                created_at: seq,
            };
            db.add_deployment(&stored, "j1", 1).unwrap();
        }
        let sequences = |s: &pb::ServiceStatus| -> Vec<u64> {
            s.deployments
                .iter()
                .map(|d| serde_json::from_slice::<DeploymentRecord>(&d.record).unwrap().sequence)
                .collect()
        };
        for (asked, shown) in [(Some("triage"), SHOWN_OF_ONE), (None, SHOWN_OF_EACH)] {
            let listed = statuses(&db, asked).unwrap();
            assert_eq!(listed.len(), 1);
            let s = &listed[0];
            let mut expected: Vec<u64> = (total + 1 - shown as u64..=total).rev().collect();
            expected.push(3);
            assert_eq!(sequences(s), expected, "{asked:?}");
            assert_eq!((s.deployments_total, s.created_at), (total, 1));
        }
        // Only the current deployment's model is pulled, and only by a
        // party whose updates are in it.
        let e = model_for_pull(&db, "a", "triage", total - 1).unwrap_err();
        assert!(e.contains("no current deployment 99"), "{e}");
        let e = model_for_pull(&db, "a", "triage", total).unwrap_err();
        assert!(e.contains("party a took no part in job j1"), "no rounds recorded: {e}");
        let record = |round: u32, participants: &[&str]| confide_proto::status::RoundRecord {
            round,
            metrics: Default::default(),
            participants: participants.iter().map(|p| p.to_string()).collect(),
            dropped: Default::default(),
            completed_at: 1,
            roles: Default::default(),
        };
        db.save_checkpoint("j1", 1, None, None, Some(&record(1, &["a", "b"]))).unwrap();
        db.save_checkpoint("j1", 2, None, None, Some(&record(2, &["c"]))).unwrap();
        let e = model_for_pull(&db, "a", "triage", total).unwrap_err();
        assert!(e.contains("reading the model of job j1 round 1"), "a took part: the model is read: {e}");
        for outsider in ["c", "d"] {
            let e = model_for_pull(&db, outsider, "triage", total).unwrap_err();
            assert!(e.contains(&format!("party {outsider} took no part in job j1")), "{e}");
        }
        // A party that joined the job (setup's statistics are in every
        // round's model) may pull it; one excluded or refused may not.
        let joined = |state| PartyStatus { state, detail: None, last_round: 0 };
        db.save_parties(
            "j1",
            [
                ("e".to_string(), joined(PartyState::Accepted)),
                ("f".to_string(), joined(PartyState::Failed)),
                // Dropped is also what a party that never accepted is marked.
                ("g".to_string(), joined(PartyState::Dropped)),
            ]
            .iter()
            .map(|(k, v)| (k, v)),
        )
        .unwrap();
        assert!(db.took_part("j1", "e", 0).unwrap());
        assert!(!db.took_part("j1", "f", 0).unwrap() && !db.took_part("j1", "g", 0).unwrap());
        // A job started from j1's round 1 (an incremental pipeline's next
        // candidate): j1's parties are in its models too, c is not.
        let child = JobSpec { from_job: Some("j1".into()), ..JobSpec::parse(spec, "t", &Limits::default()).unwrap() };
        db.insert_job("j2", &child, Some(1)).unwrap();
        db.save_checkpoint("j2", 1, None, None, Some(&record(1, &["b"]))).unwrap();
        assert!(db.took_part("j2", "a", 1).unwrap(), "a is in j2's model through j1's round 1");
        assert!(db.took_part("j2", "b", 1).unwrap());
        assert!(!db.took_part("j2", "c", 1).unwrap(), "c took part in j1's round 2, after j2's start");
        assert!(!db.took_part("j2", "e", 1).unwrap(), "joining j1 is not taking part in its rounds up to j2's start");
    }
}
