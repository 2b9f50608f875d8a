//! The job status document: what `confide job status ID --json` prints and
//! what the admin API returns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Named scalar metrics.
pub type Metrics = BTreeMap<String, f64>;

/// A job's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Submitted; recruiting parties.
    Pending,
    /// Rounds under way.
    Running,
    /// Finished all rounds.
    Succeeded,
    /// Stopped by an error (see `error`).
    Failed,
    /// Stopped by `confide job cancel`.
    Cancelled,
}

impl JobState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<JobState> {
        Some(match s {
            "pending" => JobState::Pending,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A party's standing in one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartyState {
    /// Offered the job; no answer yet.
    Invited,
    /// Accepted; takes part in rounds.
    Accepted,
    /// Refused the job (see `detail`).
    Refused,
    /// Left the current round (disconnected, timed out, bad update).
    Dropped,
    /// Excluded from the job (architecture mismatch, repeated failures).
    Failed,
}

impl PartyState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            PartyState::Invited => "invited",
            PartyState::Accepted => "accepted",
            PartyState::Refused => "refused",
            PartyState::Dropped => "dropped",
            PartyState::Failed => "failed",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<PartyState> {
        Some(match s {
            "invited" => PartyState::Invited,
            "accepted" => PartyState::Accepted,
            "refused" => PartyState::Refused,
            "dropped" => PartyState::Dropped,
            "failed" => PartyState::Failed,
            _ => return None,
        })
    }
}

/// A party's status in a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartyStatus {
    /// Its state.
    pub state: PartyState,
    /// Why (refusal reason, drop reason), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Last round it contributed to.
    #[serde(default)]
    pub last_round: u32,
}

/// One completed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// The round, from 1.
    pub round: u32,
    /// Aggregated metrics (train_loss, loss, accuracy, ...).
    pub metrics: Metrics,
    /// Parties whose updates were aggregated.
    pub participants: Vec<String>,
    /// Parties that dropped, with the stage and reason.
    pub dropped: BTreeMap<String, String>,
    /// Unix seconds.
    pub completed_at: u64,
    /// What the aggregation protocol says parties did in the round beyond
    /// contributing, by role (e.g. `decryptors` under `he`, or the members
    /// of a relay's group).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub roles: BTreeMap<String, Vec<String>>,
}

/// How a job protects the parties' data, and what it has spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyStatus {
    /// The aggregation protocol (`none`, `secagg`, `he`, ...).
    pub aggregation: String,
    /// The differential-privacy level, when the job has one (null otherwise).
    #[serde(default)]
    pub dp: Option<String>,
    /// Spent ε, when DP is on (null otherwise).
    #[serde(default)]
    pub epsilon: Option<f64>,
    /// δ, when DP is on (null otherwise).
    #[serde(default)]
    pub delta: Option<f64>,
    /// The accountant that computed ε (`rdp`), when DP is on.
    #[serde(default)]
    pub accountant: Option<String>,
    /// What the rounds so far cost each record of a hospital's data set,
    /// as its ledger accounts it, when DP is on: under party-level DP at
    /// twice the sensitivity (a record moves its party's whole clipped
    /// contribution), more than `epsilon` with a fixed clip and equal to it
    /// under adaptive clipping; otherwise `epsilon`. (A ledger reserves the
    /// whole job up front, and counts a round a restart re-ran twice.)
    #[serde(default)]
    pub record_epsilon: Option<f64>,
}

/// The latest model of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The round it comes from (0: initial model).
    pub round: u32,
    /// Its path on the coordinator.
    pub path: String,
}

/// Everything `confide job status` shows. The admin API sends it as the
/// typed `confide.v1.JobStatus` message; JSON is the CLI's rendering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job id.
    pub id: String,
    /// Job name from the spec.
    pub name: String,
    /// `train` or `evaluate`.
    pub kind: String,
    /// Lifecycle state.
    pub state: JobState,
    /// Rounds completed.
    pub rounds_completed: u32,
    /// Rounds planned.
    pub rounds_total: u32,
    /// Party name → status.
    pub parties: BTreeMap<String, PartyStatus>,
    /// Latest aggregated metrics.
    pub metrics: Metrics,
    /// Per-round records, oldest first.
    pub history: Vec<RoundRecord>,
    /// Privacy mode and accounting.
    pub privacy: PrivacyStatus,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Latest model checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelInfo>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub updated_at: u64,
    /// An incremental pipeline's iterations, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iterations: Vec<PipelineIteration>,
    /// What an incremental pipeline is doing now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_phase: Option<String>,
}

/// One iteration of an incremental pipeline, as `confide job status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineIteration {
    /// From 1.
    pub iteration: u32,
    /// Why it started (new rows, period).
    pub trigger: String,
    /// New labelled rows across the parties when it started.
    pub new_rows: u64,
    /// The post-deployment check of the previous deployment on the new
    /// rows, and any rollback it led to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub check: String,
    /// The candidate's training job.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub candidate_job: String,
    /// The round the candidate is the model after.
    pub candidate_round: u32,
    /// The gate metric of the candidate on the held-out rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_metric: Option<f64>,
    /// The gate metric of the deployed version on the held-out rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_metric: Option<f64>,
    /// The gate's verdict.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gate: String,
    /// The deployment made (its sequence), if the gate passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed_sequence: Option<u64>,
    /// `running`, `deployed`, `kept`, `failed` or `paused`.
    pub outcome: String,
    /// Unix seconds.
    pub started_at: u64,
    /// Unix seconds (0 while running).
    pub finished_at: u64,
    /// Milliseconds from the trigger to the stored deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_to_deploy_ms: Option<u64>,
    /// Of which the parties' training and evaluation took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<u64>,
}

impl From<PipelineIteration> for pb::PipelineIteration {
    fn from(i: PipelineIteration) -> Self {
        pb::PipelineIteration {
            iteration: i.iteration,
            trigger: i.trigger,
            new_rows: i.new_rows,
            check: i.check,
            candidate_job: i.candidate_job,
            candidate_round: i.candidate_round,
            candidate_metric: i.candidate_metric,
            deployed_metric: i.deployed_metric,
            gate: i.gate,
            deployed_sequence: i.deployed_sequence,
            outcome: i.outcome,
            started_at: i.started_at,
            finished_at: i.finished_at,
            trigger_to_deploy_ms: i.trigger_to_deploy_ms,
            compute_ms: i.compute_ms,
        }
    }
}

impl From<pb::PipelineIteration> for PipelineIteration {
    fn from(i: pb::PipelineIteration) -> Self {
        PipelineIteration {
            iteration: i.iteration,
            trigger: i.trigger,
            new_rows: i.new_rows,
            check: i.check,
            candidate_job: i.candidate_job,
            candidate_round: i.candidate_round,
            candidate_metric: i.candidate_metric,
            deployed_metric: i.deployed_metric,
            gate: i.gate,
            deployed_sequence: i.deployed_sequence,
            outcome: i.outcome,
            started_at: i.started_at,
            finished_at: i.finished_at,
            trigger_to_deploy_ms: i.trigger_to_deploy_ms,
            compute_ms: i.compute_ms,
        }
    }
}

// ------------------------------------------------------------- wire form

use crate::{Error, pb};

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => pb::JobState::Pending,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

impl TryFrom<i32> for JobState {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self, Error> {
        Ok(match pb::JobState::try_from(v).unwrap_or(pb::JobState::Unspecified) {
            pb::JobState::Pending => JobState::Pending,
            pb::JobState::Running => JobState::Running,
            pb::JobState::Succeeded => JobState::Succeeded,
            pb::JobState::Failed => JobState::Failed,
            pb::JobState::Cancelled => JobState::Cancelled,
            pb::JobState::Unspecified => return Err(Error::ProtocolViolation(format!("job state {v}"))),
        })
    }
}

impl From<PartyState> for pb::PartyState {
    fn from(s: PartyState) -> Self {
        match s {
            PartyState::Invited => pb::PartyState::Invited,
            PartyState::Accepted => pb::PartyState::Accepted,
            PartyState::Refused => pb::PartyState::Refused,
            PartyState::Dropped => pb::PartyState::Dropped,
            PartyState::Failed => pb::PartyState::Failed,
        }
    }
}

impl TryFrom<i32> for PartyState {
    type Error = Error;
    fn try_from(v: i32) -> Result<Self, Error> {
        Ok(match pb::PartyState::try_from(v).unwrap_or(pb::PartyState::Unspecified) {
            pb::PartyState::Invited => PartyState::Invited,
            pb::PartyState::Accepted => PartyState::Accepted,
            pb::PartyState::Refused => PartyState::Refused,
            pb::PartyState::Dropped => PartyState::Dropped,
            pb::PartyState::Failed => PartyState::Failed,
            pb::PartyState::Unspecified => return Err(Error::ProtocolViolation(format!("party state {v}"))),
        })
    }
}

impl From<RoundRecord> for pb::RoundRecord {
    fn from(r: RoundRecord) -> Self {
        pb::RoundRecord {
            round: r.round,
            metrics: r.metrics.into_iter().collect(),
            participants: r.participants,
            dropped: r.dropped.into_iter().collect(),
            completed_at: r.completed_at,
            roles: r.roles.into_iter().map(|(k, v)| (k, pb::PartyList { parties: v })).collect(),
        }
    }
}

impl From<pb::RoundRecord> for RoundRecord {
    fn from(r: pb::RoundRecord) -> Self {
        RoundRecord {
            round: r.round,
            metrics: r.metrics.into_iter().collect(),
            participants: r.participants,
            dropped: r.dropped.into_iter().collect(),
            completed_at: r.completed_at,
            roles: r.roles.into_iter().map(|(k, v)| (k, v.parties)).collect(),
        }
    }
}

impl From<JobStatus> for pb::JobStatus {
    fn from(s: JobStatus) -> Self {
        pb::JobStatus {
            id: s.id,
            name: s.name,
            kind: s.kind,
            state: pb::JobState::from(s.state) as i32,
            rounds_completed: s.rounds_completed,
            rounds_total: s.rounds_total,
            parties: s
                .parties
                .into_iter()
                .map(|(n, p)| {
                    let st = pb::PartyStatus {
                        state: pb::PartyState::from(p.state) as i32,
                        detail: p.detail,
                        last_round: p.last_round,
                    };
                    (n, st)
                })
                .collect(),
            metrics: s.metrics.into_iter().collect(),
            history: s.history.into_iter().map(pb::RoundRecord::from).collect(),
            privacy: Some(pb::PrivacyStatus {
                aggregation: s.privacy.aggregation,
                dp: s.privacy.dp,
                epsilon: s.privacy.epsilon,
                delta: s.privacy.delta,
                accountant: s.privacy.accountant,
                record_epsilon: s.privacy.record_epsilon,
            }),
            error: s.error,
            model: s.model.map(|m| pb::ModelInfo { round: m.round, path: m.path }),
            created_at: s.created_at,
            updated_at: s.updated_at,
            iterations: s.iterations.into_iter().map(pb::PipelineIteration::from).collect(),
            pipeline_phase: s.pipeline_phase.unwrap_or_default(),
        }
    }
}

impl TryFrom<pb::JobStatus> for JobStatus {
    type Error = Error;
    fn try_from(s: pb::JobStatus) -> Result<Self, Error> {
        let parties = s
            .parties
            .into_iter()
            .map(|(n, p)| {
                let state = PartyState::try_from(p.state)?;
                Ok((n, PartyStatus { state, detail: p.detail, last_round: p.last_round }))
            })
            .collect::<Result<_, Error>>()?;
        let privacy = s.privacy.unwrap_or_default();
        Ok(JobStatus {
            id: s.id,
            name: s.name,
            kind: s.kind,
            state: JobState::try_from(s.state)?,
            rounds_completed: s.rounds_completed,
            rounds_total: s.rounds_total,
            parties,
            metrics: s.metrics.into_iter().collect(),
            history: s.history.into_iter().map(RoundRecord::from).collect(),
            privacy: PrivacyStatus {
                aggregation: privacy.aggregation,
                dp: privacy.dp,
                epsilon: privacy.epsilon,
                delta: privacy.delta,
                accountant: privacy.accountant,
                record_epsilon: privacy.record_epsilon,
            },
            error: s.error,
            model: s.model.map(|m| ModelInfo { round: m.round, path: m.path }),
            created_at: s.created_at,
            updated_at: s.updated_at,
            iterations: s.iterations.into_iter().map(PipelineIteration::from).collect(),
            pipeline_phase: Some(s.pipeline_phase).filter(|p| !p.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_survives_the_wire_and_renders_privacy_with_nulls() {
        let st = JobStatus {
            id: "j1".into(),
            name: "n".into(),
            kind: "train".into(),
            state: JobState::Running,
            rounds_completed: 1,
            rounds_total: 3,
            parties: [(
                "a".to_string(),
                PartyStatus { state: PartyState::Dropped, detail: Some("x".into()), last_round: 1 },
            )]
            .into(),
            metrics: [("loss".to_string(), 0.5)].into(),
            history: vec![RoundRecord {
                round: 1,
                metrics: Metrics::new(),
                participants: vec!["a".into()],
                dropped: [("b".to_string(), "fit: disconnected".to_string())].into(),
                completed_at: 9,
                roles: [("decryptors".to_string(), vec!["a".into()])].into(),
            }],
            privacy: PrivacyStatus {
                aggregation: "secagg".into(),
                dp: None,
                epsilon: None,
                delta: None,
                accountant: None,
                record_epsilon: None,
            },
            error: None,
            model: Some(ModelInfo { round: 1, path: "/m".into() }),
            created_at: 1,
            updated_at: 2,
            iterations: vec![PipelineIteration {
                iteration: 1,
                trigger: "120 new rows".into(),
                new_rows: 120,
                candidate_metric: Some(0.9),
                outcome: "deployed".into(),
                deployed_sequence: Some(2),
                ..PipelineIteration::default()
            }],
            pipeline_phase: Some("waiting".into()),
        };
        let back = JobStatus::try_from(pb::JobStatus::from(st.clone())).unwrap();
        assert_eq!(back, st);
        let json: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(
            json["privacy"],
            serde_json::json!({
                "aggregation": "secagg", "dp": null, "epsilon": null, "delta": null, "accountant": null,
                "record_epsilon": null
            })
        );
        assert!(JobState::try_from(0).is_err());
    }
}
