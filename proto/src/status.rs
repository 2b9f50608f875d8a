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
}

/// Privacy accounting of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyStatus {
    /// The mode (`none`, later `secagg`, `he`, `dp`).
    pub mode: String,
    /// Spent ε, when DP is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// δ, when DP is on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

/// The latest model of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The round it comes from (0: initial model).
    pub round: u32,
    /// Its path on the coordinator.
    pub path: String,
}

/// Everything `confide job status` shows.
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
}
