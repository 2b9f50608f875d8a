//! The coordinator's embedded SQLite database: federation, jobs, party
//! statuses, rounds and metrics. Model checkpoints are safetensors files in
//! `DATA_DIR/models/JOB/`, written (and fsynced) before the row that points at
//! them, so a crash never leaves a row without its model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use confide_proto::jobspec::JobSpec;
use confide_proto::status::{
    JobState, JobStatus, ModelInfo, PartyState, PartyStatus, PipelineIteration, PrivacyStatus, RoundRecord,
};
use rusqlite::{Connection, OptionalExtension, params};

use crate::Error;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE parties (
        name TEXT PRIMARY KEY,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        connected INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec_toml TEXT NOT NULL,
        state TEXT NOT NULL,
        privacy_mode TEXT NOT NULL,
        rounds_total INTEGER NOT NULL,
        rounds_completed INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        model_round INTEGER,
        model_path TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE job_parties (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        party TEXT NOT NULL,
        state TEXT NOT NULL,
        detail TEXT,
        last_round INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, party)
    );
    CREATE TABLE rounds (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        round INTEGER NOT NULL,
        metrics_json TEXT NOT NULL,
        participants_json TEXT NOT NULL,
        dropped_json TEXT NOT NULL,
        completed_at INTEGER NOT NULL,
        PRIMARY KEY (job_id, round)
    );",
    // 2: the job machine's state (strategy moments) saved with each
    // checkpoint, and the last checkpoint's round (a job kind without a
    // model checkpoints its records and state only)
    "ALTER TABLE jobs ADD COLUMN state_path TEXT;
     ALTER TABLE jobs ADD COLUMN checkpoint_round INTEGER;",
    // 3: a [dp] job's level, delta and accountant (its epsilon is in each
    // round's record)
    "ALTER TABLE jobs ADD COLUMN dp_level TEXT;
     ALTER TABLE jobs ADD COLUMN dp_delta REAL;
     ALTER TABLE jobs ADD COLUMN dp_accountant TEXT;",
    // 4: what the aggregation protocol says parties did in a round, by role
    // (decryptors, relay groups)
    "ALTER TABLE rounds ADD COLUMN roles_json TEXT NOT NULL DEFAULT '{}';",
    // 5: model versions: every kept checkpoint of a model, with its lineage
    // (job, round, the round's metrics) and digest, instead of only the
    // latest path in jobs
    "CREATE TABLE models (
        job_id TEXT NOT NULL REFERENCES jobs(id),
        round INTEGER NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        metrics_json TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (job_id, round)
    );",
    // 6: service deployments: each an administrator's signed record binding
    // a model version to a service, kept forever (the rollback history);
    // the versions they name are never removed by retention
    "CREATE TABLE deployments (
        service TEXT NOT NULL,
        sequence INTEGER NOT NULL,
        job_id TEXT NOT NULL,
        round INTEGER NOT NULL,
        record BLOB NOT NULL,
        signature BLOB NOT NULL,
        admin_certificate BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (service, sequence)
    );",
    // 7: incremental pipelines: the administrator's grant (a pipeline's
    // deployments carry it), what the pipeline is doing, and its iterations
    "ALTER TABLE deployments ADD COLUMN grant_msg BLOB;
    CREATE TABLE pipelines (
        job_id TEXT PRIMARY KEY,
        grant_msg BLOB NOT NULL,
        phase TEXT NOT NULL,
        last_trigger_at INTEGER NOT NULL
    );
    CREATE TABLE pipeline_iterations (
        job_id TEXT NOT NULL,
        iteration INTEGER NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (job_id, iteration)
    );",
    // 8: the model a job started from (`from_job` and its round), so that a
    // job resumed before its first checkpoint starts from that model again,
    // not from whatever is newest in `from_job` by then (a deployed version
    // may be an older round), and retention keeps that version meanwhile
    "ALTER TABLE jobs ADD COLUMN from_round INTEGER;
     ALTER TABLE jobs ADD COLUMN from_job TEXT;",
    // 9: the nonces of the relay delegations admitted lately, so that a
    // relay cannot present one again after a restart (in memory only, one
    // made in the last minutes could be replayed once more)
    "CREATE TABLE relay_nonces (nonce BLOB PRIMARY KEY, at INTEGER NOT NULL);
     CREATE INDEX relay_nonces_at ON relay_nonces (at);",
    // 10: the newest revocation list this coordinator has put in force, so
    // that an older or missing `revoked.crl.pem` (a restored backup, another
    // copy of the PKI directory) cannot bring revoked certificates back
    "CREATE TABLE revocation_list (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL, der BLOB NOT NULL);",
];

/// A stored deployment: the signed record as the administrator sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDeployment {
    /// The service.
    pub service: String,
    /// Its sequence within the service.
    pub sequence: u64,
    /// The record's bytes, as signed.
    pub record: Vec<u8>,
    /// The administrator's signature.
    pub signature: Vec<u8>,
    /// The administrator's certificate, DER (the coordinator's under a grant).
    pub admin_certificate: Vec<u8>,
    /// The administrator's grant, for a pipeline's deployment (encoded
    /// `confide.v1.SignedGrant`).
    pub grant: Option<Vec<u8>>,
    /// When the coordinator stored it (Unix seconds).
    pub created_at: u64,
}

/// A model checkpoint as written: where, its SHA-256 and size.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedModel {
    /// The safetensors file.
    pub path: PathBuf,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
}

/// One kept version of a job's model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelVersion {
    /// The job that trained it.
    pub job_id: String,
    /// The round it is the global model after.
    pub round: u32,
    /// The file.
    pub path: PathBuf,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// File size.
    pub bytes: u64,
    /// The round's aggregated metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Unix seconds.
    pub created_at: u64,
}

/// A job that was not finished when the coordinator stopped.
#[derive(Debug, Clone)]
pub struct UnfinishedJob {
    /// Job id.
    pub id: String,
    /// Its spec, TOML.
    pub spec_toml: String,
    /// Rounds completed.
    pub rounds_completed: u32,
    /// The round of the latest checkpoint, if any.
    pub checkpoint: Option<u32>,
    /// Latest model (round, path), if any.
    pub model: Option<(u32, PathBuf)>,
    /// The job machine's state saved with the latest checkpoint, if any.
    pub state: Option<PathBuf>,
    /// Persisted party statuses.
    pub parties: BTreeMap<String, PartyStatus>,
    /// The round of `from_job`'s model it started from (`None` before
    /// migration 8, or without `from_job`).
    pub from_round: Option<u32>,
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn sql(e: rusqlite::Error) -> Error {
    Error::Storage(e.to_string())
}

impl Db {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Db, Error> {
        let mut conn = Connection::open(path).map_err(|e| Error::Storage(format!("{}: {e}", path.display())))?;
        conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")
            .map_err(sql)?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(sql)?;
        if version > MIGRATIONS.len() {
            return Err(Error::Storage(format!(
                "{}: schema version {version} is newer than this confide understands ({}); upgrade confide",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(sql)?;
            tx.execute_batch(m).map_err(sql)?;
            tx.pragma_update(None, "user_version", i + 1).map_err(sql)?;
            tx.commit().map_err(sql)?;
        }
        Ok(Db { conn: Arc::new(Mutex::new(conn)) })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records relay delegation `nonce`'s use at `now` (Unix seconds),
    /// forgetting those older than `keep_secs` (which fail the time check
    /// anyway): false if it was used before, whatever restarts came between.
    pub fn first_use_of_nonce(&self, nonce: &[u8], now: u64, keep_secs: u64) -> Result<bool, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql)?;
        tx.execute("DELETE FROM relay_nonces WHERE at < ?1", params![now.saturating_sub(keep_secs) as i64])
            .map_err(sql)?;
        let added = tx
            .execute("INSERT OR IGNORE INTO relay_nonces (nonce, at) VALUES (?1, ?2)", params![nonce, now as i64])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        Ok(added == 1)
    }

    /// The newest revocation list put in force (its DER), if any.
    pub fn revocation_list(&self) -> Result<Option<Vec<u8>>, Error> {
        self.lock().query_row("SELECT der FROM revocation_list WHERE id = 1", [], |r| r.get(0)).optional().map_err(sql)
    }

    /// Forgets the list kept (another CA's).
    pub fn forget_revocation_list(&self) -> Result<(), Error> {
        self.lock().execute("DELETE FROM revocation_list", []).map_err(sql)?;
        Ok(())
    }

    /// Records `der`, version `version`, as the list in force, unless one
    /// at least as new is recorded.
    pub fn keep_revocation_list(&self, version: u64, der: &[u8]) -> Result<(), Error> {
        self.lock()
            .execute(
                "INSERT INTO revocation_list (id, version, der) VALUES (1, ?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET version = ?1, der = ?2 WHERE version < ?1",
                params![version as i64, der],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Records that a party connected or disconnected.
    pub fn party_seen(&self, name: &str, connected: bool) -> Result<(), Error> {
        let now = unix_now() as i64;
        self.lock()
            .execute(
                "INSERT INTO parties (name, first_seen, last_seen, connected) VALUES (?1, ?2, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET last_seen = ?2, connected = ?3",
                params![name, now, connected],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Every party ever connected: name, first and latest connection (Unix seconds).
    pub fn parties_seen(&self) -> Result<Vec<(String, u64, u64)>, Error> {
        let conn = self.lock();
        let mut stmt = conn.prepare("SELECT name, first_seen, last_seen FROM parties ORDER BY name").map_err(sql)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
            .map_err(sql)?;
        rows.map(|r| r.map(|(n, f, l)| (n, f.max(0) as u64, l.max(0) as u64)).map_err(sql)).collect()
    }

    /// Marks every party disconnected (at start-up).
    pub fn reset_connections(&self) -> Result<(), Error> {
        self.lock().execute("UPDATE parties SET connected = 0", []).map_err(sql)?;
        Ok(())
    }

    /// Stores a newly submitted job; `from_round` is the round of its
    /// `from_job`'s model it starts from.
    pub fn insert_job(&self, id: &str, spec: &JobSpec, from_round: Option<u32>) -> Result<(), Error> {
        let now = unix_now() as i64;
        let conn = self.lock();
        conn.execute(
            "INSERT INTO jobs (id, name, kind, spec_toml, state, privacy_mode, rounds_total, created_at, updated_at,
                               dp_level, dp_delta, dp_accountant, from_round, from_job)
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                id,
                spec.name,
                spec.kind.as_str(),
                spec.to_toml(),
                spec.aggregation.protocol,
                spec.rounds,
                now,
                spec.dp.as_ref().map(|d| d.level.as_str()),
                spec.dp.as_ref().map(|d| d.delta),
                spec.dp.as_ref().map(|d| d.accountant.as_str()),
                from_round,
                from_round.and(spec.from_job.as_deref()),
            ],
        )
        .map_err(sql)?;
        Ok(())
    }

    /// A job's state, `None` when no job of this id was ever submitted.
    pub fn job_state(&self, id: &str) -> Result<Option<JobState>, Error> {
        let state: Option<String> = self
            .lock()
            .query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        state
            .map(|s| JobState::parse(&s).ok_or_else(|| Error::Storage(format!("job {id}: unknown state {s:?}"))))
            .transpose()
    }

    /// Sets a job's state (and error).
    pub fn set_job_state(&self, id: &str, state: JobState, error: Option<&str>) -> Result<(), Error> {
        self.lock()
            .execute(
                "UPDATE jobs SET state = ?2, error = COALESCE(?3, error), updated_at = ?4 WHERE id = ?1",
                params![id, state.as_str(), error, unix_now() as i64],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Writes the statuses of the parties given (those that changed).
    pub fn save_parties<'a>(
        &self,
        id: &str,
        parties: impl IntoIterator<Item = (&'a String, &'a PartyStatus)>,
    ) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql)?;
        for (name, st) in parties {
            tx.execute(
                "INSERT INTO job_parties (job_id, party, state, detail, last_round) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(job_id, party) DO UPDATE SET state = ?3, detail = ?4, last_round = ?5",
                params![id, name, st.state.as_str(), st.detail, st.last_round],
            )
            .map_err(sql)?;
        }
        tx.execute("UPDATE jobs SET updated_at = ?2 WHERE id = ?1", params![id, unix_now() as i64]).map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Records a checkpoint: the model file and the state file (both already
    /// durable; a kind without a model has none) and the round's record, in
    /// one transaction.
    pub fn save_checkpoint(
        &self,
        id: &str,
        round: u32,
        model: Option<&SavedModel>,
        state: Option<&Path>,
        record: Option<&RoundRecord>,
    ) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql)?;
        if let Some(m) = model {
            let metrics = record.map(|r| &r.metrics).cloned().unwrap_or_default();
            tx.execute(
                "INSERT OR REPLACE INTO models (job_id, round, path, sha256, bytes, metrics_json, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    round,
                    m.path.to_string_lossy(),
                    m.sha256,
                    m.bytes as i64,
                    serde_json::to_string(&metrics).map_err(|e| Error::Storage(e.to_string()))?,
                    unix_now() as i64
                ],
            )
            .map_err(sql)?;
        }
        if let Some(r) = record {
            let json = |v: &dyn erased::Json| v.to_json();
            tx.execute(
                "INSERT OR REPLACE INTO rounds (job_id, round, metrics_json, participants_json, dropped_json, completed_at,
                 roles_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    id,
                    r.round,
                    json(&r.metrics),
                    json(&r.participants),
                    json(&r.dropped),
                    r.completed_at as i64,
                    json(&r.roles)
                ],
            )
            .map_err(sql)?;
        }
        tx.execute(
            "UPDATE jobs SET rounds_completed = MAX(rounds_completed, ?2), checkpoint_round = ?3,
             model_round = CASE WHEN ?4 IS NULL THEN model_round ELSE ?3 END, model_path = COALESCE(?4, model_path),
             state_path = ?6, state = 'running', updated_at = ?5 WHERE id = ?1",
            params![
                id,
                record.map_or(0, |r| r.round),
                round,
                model.map(|m| m.path.to_string_lossy().into_owned()),
                unix_now() as i64,
                state.map(|p| p.to_string_lossy().into_owned())
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Jobs that were pending or running.
    pub fn unfinished_jobs(&self) -> Result<Vec<UnfinishedJob>, Error> {
        let ids: Vec<String> = {
            let conn = self.lock();
            let mut st = conn
                .prepare("SELECT id FROM jobs WHERE state IN ('pending', 'running') ORDER BY created_at")
                .map_err(sql)?;
            st.query_map([], |r| r.get(0)).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?
        };
        let mut out = Vec::new();
        for id in ids {
            let conn = self.lock();
            type Row = (String, u32, Option<u32>, Option<String>, Option<String>, Option<u32>, Option<u32>);
            let (spec_toml, rounds_completed, model_round, model_path, state_path, checkpoint_round, from_round): Row =
                conn.query_row(
                    "SELECT spec_toml, rounds_completed, model_round, model_path, state_path, checkpoint_round,
                            from_round
                     FROM jobs WHERE id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
                )
                .map_err(sql)?;
            drop(conn);
            let parties = self.parties_of(&id)?;
            out.push(UnfinishedJob {
                id,
                spec_toml,
                rounds_completed,
                // Databases from before migration 2 have model checkpoints only.
                checkpoint: checkpoint_round.or(model_round),
                model: model_round.zip(model_path.map(PathBuf::from)),
                state: state_path.map(PathBuf::from),
                parties,
                from_round,
            });
        }
        Ok(out)
    }

    fn parties_of(&self, id: &str) -> Result<BTreeMap<String, PartyStatus>, Error> {
        let conn = self.lock();
        let mut st =
            conn.prepare("SELECT party, state, detail, last_round FROM job_parties WHERE job_id = ?1").map_err(sql)?;
        let rows = st
            .query_map([id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<String>>(2)?, r.get(3)?))
            })
            .map_err(sql)?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (name, state, detail, last_round) = row.map_err(sql)?;
            let state = PartyState::parse(&state)
                .ok_or_else(|| Error::Storage(format!("job {id}: party {name} has unknown state {state:?}")))?;
            out.insert(name, PartyStatus { state, detail, last_round });
        }
        Ok(out)
    }

    /// The model checkpoint of a job: (round, path).
    pub fn model_of(&self, id: &str) -> Result<Option<(u32, PathBuf)>, Error> {
        let row: Option<(Option<u32>, Option<String>)> = self
            .lock()
            .query_row("SELECT model_round, model_path FROM jobs WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(sql)?;
        match row {
            None => Err(Error::NotFound(format!("job {id}"))),
            Some((r, p)) => Ok(r.zip(p.map(PathBuf::from))),
        }
    }

    /// Kept model versions, of one job or all, newest first.
    pub fn model_versions(&self, job: Option<&str>) -> Result<Vec<ModelVersion>, Error> {
        let conn = self.lock();
        let mut st = conn
            .prepare(
                "SELECT job_id, round, path, sha256, bytes, metrics_json, created_at FROM models
                 WHERE ?1 IS NULL OR job_id = ?1 ORDER BY created_at DESC, job_id, round DESC",
            )
            .map_err(sql)?;
        let rows = st
            .query_map(params![job], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (job_id, round, path, sha256, bytes, metrics, at) = row.map_err(sql)?;
            let metrics = serde_json::from_str(&metrics)
                .map_err(|e| Error::Storage(format!("model of job {job_id} round {round}: {e}")))?;
            out.push(ModelVersion {
                job_id,
                round,
                path: PathBuf::from(path),
                sha256,
                bytes: bytes as u64,
                metrics,
                created_at: at as u64,
            });
        }
        Ok(out)
    }

    /// The kept version of `job`'s model after `round`.
    pub fn model_version(&self, job: &str, round: u32) -> Result<Option<ModelVersion>, Error> {
        Ok(self.model_versions(Some(job))?.into_iter().find(|m| m.round == round))
    }

    /// Forgets all but the newest `keep_last` versions of `job`'s model
    /// (never its latest checkpoint, which a resumed job starts from, nor
    /// a version any service's deployment history names, nor one an
    /// unfinished job started from) and returns the
    /// files no longer referenced, for the caller to delete.
    pub fn forget_model_versions(&self, job: &str, keep_last: usize) -> Result<Vec<PathBuf>, Error> {
        let versions = self.model_versions(Some(job))?;
        let mut rounds: Vec<u32> = versions.iter().map(|v| v.round).collect();
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        let old: Vec<u32> = rounds.into_iter().skip(keep_last.max(1)).collect();
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql)?;
        let mut gone = Vec::new();
        for r in &old {
            let deployed: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM deployments WHERE job_id = ?1 AND round = ?2",
                    params![job, r],
                    |row| row.get(0),
                )
                .map_err(sql)?;
            // Nor a version an unfinished job started from: resumed before
            // its first checkpoint, it starts from that version again (found
            // by review).
            let pinned: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM jobs WHERE from_job = ?1 AND from_round = ?2
                     AND state IN ('pending', 'running')",
                    params![job, r],
                    |row| row.get(0),
                )
                .map_err(sql)?;
            if deployed > 0 || pinned > 0 {
                continue;
            }
            tx.execute("DELETE FROM models WHERE job_id = ?1 AND round = ?2", params![job, r]).map_err(sql)?;
            if let Some(v) = versions.iter().find(|v| v.round == *r) {
                gone.push(v.path.clone());
            }
        }
        tx.commit().map_err(sql)?;
        Ok(gone)
    }

    /// Stores a deployment as the next of its service: `sequence` must be
    /// one more than the service's newest (else another deployment came
    /// first, and the caller signs again). `job_id`/`round` name the version,
    /// which retention then keeps for good.
    pub fn add_deployment(&self, d: &StoredDeployment, job_id: &str, round: u32) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql)?;
        let newest: i64 = tx
            .query_row("SELECT COALESCE(MAX(sequence), 0) FROM deployments WHERE service = ?1", [&d.service], |r| {
                r.get(0)
            })
            .map_err(sql)?;
        if d.sequence != newest as u64 + 1 {
            return Err(Error::Refused(format!(
                "service {}: deployment {} is not the next (the newest is {newest}); list the service and sign again",
                d.service, d.sequence
            )));
        }
        let kept: bool = tx
            .query_row("SELECT COUNT(*) FROM models WHERE job_id = ?1 AND round = ?2", params![job_id, round], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n > 0)
            .map_err(sql)?;
        if !kept {
            return Err(Error::NotFound(format!("no kept model version of job {job_id} after round {round}")));
        }
        tx.execute(
            "INSERT INTO deployments (service, sequence, job_id, round, record, signature, admin_certificate, created_at,
                                      grant_msg)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                d.service,
                d.sequence as i64,
                job_id,
                round,
                d.record,
                d.signature,
                d.admin_certificate,
                d.created_at as i64,
                d.grant
            ],
        )
        .map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Deployments of one service or all, by service, newest first.
    pub fn deployments(&self, service: Option<&str>) -> Result<Vec<StoredDeployment>, Error> {
        let conn = self.lock();
        let mut st = conn
            .prepare(
                "SELECT service, sequence, record, signature, admin_certificate, created_at, grant_msg FROM deployments
                 WHERE ?1 IS NULL OR service = ?1 ORDER BY service, sequence DESC",
            )
            .map_err(sql)?;
        let rows = st
            .query_map(params![service], |r| {
                Ok(StoredDeployment {
                    service: r.get(0)?,
                    sequence: r.get::<_, i64>(1)? as u64,
                    record: r.get(2)?,
                    signature: r.get(3)?,
                    admin_certificate: r.get(4)?,
                    created_at: r.get::<_, i64>(5)? as u64,
                    grant: r.get(6)?,
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    /// The services whose deployment history names `job`'s version after `round`.
    pub fn services_of(&self, job: &str, round: u32) -> Result<Vec<String>, Error> {
        let conn = self.lock();
        let mut st = conn
            .prepare("SELECT DISTINCT service FROM deployments WHERE job_id = ?1 AND round = ?2 ORDER BY service")
            .map_err(sql)?;
        let rows = st.query_map(params![job, round], |r| r.get(0)).map_err(sql)?;
        rows.collect::<Result<Vec<String>, _>>().map_err(sql)
    }

    /// A job's spec, TOML.
    pub fn spec_toml(&self, job: &str) -> Result<Option<String>, Error> {
        self.lock().query_row("SELECT spec_toml FROM jobs WHERE id = ?1", [job], |r| r.get(0)).optional().map_err(sql)
    }

    /// Removes an ended job that left nothing worth keeping (a pipeline's
    /// count of new rows that did not trigger): its rows, and its model
    /// directory under `models_dir`. A job a deployment names is kept.
    pub fn forget_job(&self, id: &str, models_dir: &Path) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(sql)?;
        let deployed: i64 =
            tx.query_row("SELECT COUNT(*) FROM deployments WHERE job_id = ?1", [id], |r| r.get(0)).map_err(sql)?;
        if deployed > 0 {
            return Ok(());
        }
        for table in ["models", "rounds", "job_parties"] {
            tx.execute(&format!("DELETE FROM {table} WHERE job_id = ?1"), [id]).map_err(sql)?;
        }
        tx.execute("DELETE FROM jobs WHERE id = ?1 AND state IN ('succeeded', 'failed', 'cancelled')", [id])
            .map_err(sql)?;
        tx.commit().map_err(sql)?;
        drop(conn);
        let dir = models_dir.join(id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(&dir, e)),
            _ => Ok(()),
        }
    }

    /// Records a newly submitted pipeline with its grant.
    pub fn insert_pipeline(&self, job_id: &str, grant: &[u8]) -> Result<(), Error> {
        self.lock()
            .execute(
                "INSERT INTO pipelines (job_id, grant_msg, phase, last_trigger_at) VALUES (?1, ?2, 'waiting', ?3)",
                params![job_id, grant, unix_now() as i64],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// A pipeline's grant, phase and last trigger time (Unix seconds).
    pub fn pipeline(&self, job_id: &str) -> Result<Option<(Vec<u8>, String, u64)>, Error> {
        self.lock()
            .query_row("SELECT grant_msg, phase, last_trigger_at FROM pipelines WHERE job_id = ?1", [job_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .optional()
            .map_err(sql)
    }

    /// Sets what a pipeline is doing (and, with `triggered`, when it last
    /// started an iteration).
    pub fn set_pipeline_phase(&self, job_id: &str, phase: &str, triggered: Option<u64>) -> Result<(), Error> {
        self.lock()
            .execute(
                "UPDATE pipelines SET phase = ?2, last_trigger_at = COALESCE(?3, last_trigger_at) WHERE job_id = ?1",
                params![job_id, phase, triggered.map(|t| t as i64)],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Writes (inserts or replaces) one iteration of a pipeline.
    pub fn save_iteration(&self, job_id: &str, it: &PipelineIteration) -> Result<(), Error> {
        let json = serde_json::to_string(it).map_err(|e| Error::Storage(format!("iteration record: {e}")))?;
        self.lock()
            .execute(
                "INSERT OR REPLACE INTO pipeline_iterations (job_id, iteration, record) VALUES (?1, ?2, ?3)",
                params![job_id, it.iteration, json],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// A pipeline's iterations, oldest first.
    pub fn iterations(&self, job_id: &str) -> Result<Vec<PipelineIteration>, Error> {
        let conn = self.lock();
        let mut st =
            conn.prepare("SELECT record FROM pipeline_iterations WHERE job_id = ?1 ORDER BY iteration").map_err(sql)?;
        let rows = st.query_map([job_id], |r| r.get::<_, String>(0)).map_err(sql)?;
        rows.map(|r| {
            let json = r.map_err(sql)?;
            serde_json::from_str(&json).map_err(|e| Error::Storage(format!("pipeline {job_id}: iteration record: {e}")))
        })
        .collect()
    }

    /// The full status of a job.
    pub fn job_status(&self, id: &str, with_history: bool) -> Result<JobStatus, Error> {
        type Row = (
            String,
            String,
            String,
            String,
            u32,
            u32,
            Option<String>,
            Option<u32>,
            Option<String>,
            i64,
            i64,
            (Option<String>, Option<f64>, Option<String>),
        );
        let row: Option<Row> = self
            .lock()
            .query_row(
                "SELECT name, kind, state, privacy_mode, rounds_total, rounds_completed, error, model_round, model_path,
                        created_at, updated_at, dp_level, dp_delta, dp_accountant FROM jobs WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                        r.get(7)?,
                        r.get(8)?,
                        r.get(9)?,
                        r.get(10)?,
                        (r.get(11)?, r.get(12)?, r.get(13)?),
                    ))
                },
            )
            .optional()
            .map_err(sql)?;
        let (name, kind, state, mode, total, done, error, model_round, model_path, created, updated, dp) =
            row.ok_or_else(|| Error::NotFound(format!("job {id}")))?;
        let (dp_level, dp_delta, dp_accountant) = dp;
        let history = self.history(id, if with_history { u32::MAX } else { 1 })?;
        let metrics = history.last().map(|r| r.metrics.clone()).unwrap_or_default();
        // ε after the last completed round (0 before any); per record, what
        // the round recorded under party-level DP (none in records written
        // before it was kept), ε itself otherwise.
        let epsilon = dp_level.as_ref().map(|_| metrics.get("epsilon").copied().unwrap_or(0.0));
        let record_epsilon = match dp_level.as_deref() {
            Some("party") => history.last().map_or(Some(0.0), |_| metrics.get("record_epsilon").copied()),
            Some(_) => epsilon,
            None => None,
        };
        Ok(JobStatus {
            id: id.to_owned(),
            name,
            kind,
            state: JobState::parse(&state).unwrap_or(JobState::Failed),
            rounds_completed: done,
            rounds_total: total,
            parties: self.parties_of(id)?,
            metrics,
            history: if with_history { history } else { Vec::new() },
            privacy: PrivacyStatus {
                aggregation: mode,
                epsilon,
                dp: dp_level,
                delta: dp_delta,
                accountant: dp_accountant,
                record_epsilon,
            },
            error,
            model: model_round.zip(model_path).map(|(round, path)| ModelInfo { round, path }),
            created_at: created as u64,
            updated_at: updated as u64,
            iterations: self.iterations(id)?,
            pipeline_phase: self.pipeline(id)?.map(|(_, phase, _)| phase),
        })
    }

    /// Whether `party`'s data may be in the model of job `id` after
    /// `round`: it took part in one of the job's rounds up to `round`, or
    /// its state in the job is `accepted` (setup's feature statistics are
    /// in every model from round 0 on; `dropped` is not enough, as parties
    /// that never accepted are marked so too), or it took part in a round,
    /// up to the one started from, of the job the model started from
    /// (`from_job`), followed back to the first job (an incremental
    /// pipeline's chain).
    pub fn took_part(&self, id: &str, party: &str, round: u32) -> Result<bool, Error> {
        let (mut job, mut upto, mut deployed) = (id.to_owned(), round, true);
        // As long as a pipeline's iterations; bounded all the same (a
        // parent predates its child, so there is no cycle).
        for _ in 0..100_000 {
            if self.joined_or_contributed(&job, party, upto, deployed)? {
                return Ok(true);
            }
            deployed = false;
            let from: Option<(Option<String>, Option<u32>)> = self
                .lock()
                .query_row("SELECT from_job, from_round FROM jobs WHERE id = ?1", params![job], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(sql)?;
            match from {
                Some((Some(parent), Some(at))) => (job, upto) = (parent, at),
                _ => return Ok(false),
            }
        }
        Ok(false)
    }

    fn joined_or_contributed(&self, id: &str, party: &str, round: u32, count_joined: bool) -> Result<bool, Error> {
        let conn = self.lock();
        if count_joined {
            let joined: Option<String> = conn
                .query_row("SELECT state FROM job_parties WHERE job_id = ?1 AND party = ?2", params![id, party], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(sql)?;
            if joined.is_some_and(|s| s == PartyState::Accepted.as_str()) {
                return Ok(true);
            }
        }
        let mut st = conn
            .prepare("SELECT round, participants_json FROM rounds WHERE job_id = ?1 AND round <= ?2")
            .map_err(sql)?;
        let rows =
            st.query_map(params![id, round], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?))).map_err(sql)?;
        for row in rows {
            let (round, p) = row.map_err(sql)?;
            let participants: Vec<String> =
                serde_json::from_str(&p).map_err(|e| Error::Storage(format!("job {id} round {round}: {e}")))?;
            if participants.iter().any(|q| q == party) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The last `limit` round records, oldest first.
    fn history(&self, id: &str, limit: u32) -> Result<Vec<RoundRecord>, Error> {
        let conn = self.lock();
        let mut st = conn
            .prepare(
                "SELECT round, metrics_json, participants_json, dropped_json, completed_at, roles_json FROM rounds
                 WHERE job_id = ?1 ORDER BY round DESC LIMIT ?2",
            )
            .map_err(sql)?;
        let rows = st
            .query_map(params![id, limit], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(sql)?;
        let mut out = Vec::new();
        for row in rows {
            let (round, m, p, d, at, roles) = row.map_err(sql)?;
            let bad = |e: serde_json::Error| Error::Storage(format!("job {id} round {round}: {e}"));
            out.push(RoundRecord {
                round,
                metrics: serde_json::from_str(&m).map_err(bad)?,
                participants: serde_json::from_str(&p).map_err(bad)?,
                dropped: serde_json::from_str(&d).map_err(bad)?,
                completed_at: at as u64,
                roles: serde_json::from_str(&roles).map_err(bad)?,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// How many jobs are in each state (for the `confide_jobs` gauge).
    pub fn job_counts(&self) -> Result<Vec<(String, i64)>, Error> {
        let conn = self.lock();
        let mut st = conn.prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state").map_err(sql)?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)
    }

    /// Every job, newest first, without history.
    pub fn list_jobs(&self) -> Result<Vec<JobStatus>, Error> {
        let ids: Vec<String> = {
            let conn = self.lock();
            let mut st = conn.prepare("SELECT id FROM jobs ORDER BY created_at DESC, id DESC").map_err(sql)?;
            st.query_map([], |r| r.get(0)).map_err(sql)?.collect::<Result<_, _>>().map_err(sql)?
        };
        ids.iter().map(|id| self.job_status(id, false)).collect()
    }
}

mod erased {
    /// Object-safe JSON encoding for the few serde types stored as JSON text.
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string(self).unwrap_or_else(|_| "null".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_proto::Limits;

    const SPEC: &str = "name = \"t\"\nkind = \"train\"\nrounds = 2\n[parties]\nnames = [\"a\"]\ndataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\n";

    #[test]
    fn job_lifecycle_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let spec = JobSpec::parse(SPEC, "t", &Limits::default()).unwrap();
        {
            let db = Db::open(&path).unwrap();
            db.insert_job("j1", &spec, None).unwrap();
            let mut parties = BTreeMap::new();
            parties.insert("a".to_string(), PartyStatus { state: PartyState::Accepted, detail: None, last_round: 1 });
            db.save_parties("j1", &parties).unwrap();
            let rec = RoundRecord {
                round: 1,
                metrics: [("loss".to_string(), 0.5)].into(),
                participants: vec!["a".into()],
                dropped: BTreeMap::new(),
                completed_at: 5,
                roles: [("decryptors".to_string(), vec!["a".into()])].into(),
            };
            let model =
                |r: u32| SavedModel { path: format!("/m/round-{r}").into(), sha256: format!("{r:064x}"), bytes: 10 };
            db.save_checkpoint("j1", 1, Some(&model(1)), Some(Path::new("/m/state-1")), Some(&rec)).unwrap();
            // A record-only checkpoint keeps the model of round 1.
            let rec2 = RoundRecord { round: 2, ..rec.clone() };
            db.save_checkpoint("j1", 2, None, None, Some(&rec2)).unwrap();
        }
        let db = Db::open(&path).unwrap();
        let st = db.job_status("j1", true).unwrap();
        assert_eq!((st.state, st.rounds_completed, st.rounds_total), (JobState::Running, 2, 2));
        assert_eq!(st.metrics["loss"], 0.5);
        assert_eq!(st.history.len(), 2);
        let un = db.unfinished_jobs().unwrap();
        assert_eq!(un[0].model, Some((1, PathBuf::from("/m/round-1"))));
        assert_eq!((un[0].checkpoint, un[0].state.as_ref()), (Some(2), None));
        db.set_job_state("j1", JobState::Failed, Some("boom")).unwrap();
        assert!(db.unfinished_jobs().unwrap().is_empty());
        assert_eq!(db.job_status("j1", false).unwrap().error.as_deref(), Some("boom"));
        assert!(matches!(db.job_status("nope", false), Err(Error::NotFound(_))));
    }

    #[test]
    fn model_versions_keep_their_lineage_and_retention_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("c.db")).unwrap();
        let spec = JobSpec::parse(SPEC, "t", &Limits::default()).unwrap();
        db.insert_job("j1", &spec, None).unwrap();
        for r in 1..=4u32 {
            let rec = RoundRecord {
                round: r,
                metrics: [("accuracy".to_string(), 0.5 + r as f64 / 10.0)].into(),
                participants: vec!["a".into()],
                dropped: BTreeMap::new(),
                completed_at: 5,
                roles: BTreeMap::new(),
            };
            let m =
                SavedModel { path: format!("/m/round-{r}").into(), sha256: format!("{r:064x}"), bytes: 10 * r as u64 };
            db.save_checkpoint("j1", r, Some(&m), None, Some(&rec)).unwrap();
        }
        let v = db.model_version("j1", 2).unwrap().unwrap();
        assert_eq!(
            (v.round, v.bytes, v.metrics["accuracy"], v.path.clone()),
            (2, 20, 0.7, PathBuf::from("/m/round-2"))
        );
        assert_eq!(db.model_versions(None).unwrap().len(), 4);
        // A version an unfinished job started from outlives retention until
        // that job ends (resumed before its first checkpoint, it starts there).
        let child = JobSpec { from_job: Some("j1".into()), ..spec.clone() };
        db.insert_job("j2", &child, Some(1)).unwrap();
        let gone = db.forget_model_versions("j1", 2).unwrap();
        assert_eq!(gone, [PathBuf::from("/m/round-2")]);
        assert!(db.model_version("j1", 1).unwrap().is_some(), "j2 started from it");
        db.set_job_state("j2", JobState::Succeeded, None).unwrap();
        // Keep the newest two: rounds 1 and 2 are forgotten, their files returned.
        let gone = db.forget_model_versions("j1", 2).unwrap();
        assert_eq!(gone, [PathBuf::from("/m/round-1")]);
        let kept: Vec<u32> = db.model_versions(Some("j1")).unwrap().iter().map(|v| v.round).collect();
        assert_eq!(kept, [4, 3]);
        assert!(db.model_version("j1", 1).unwrap().is_none());
        // Never the latest, whatever the setting.
        db.forget_model_versions("j1", 0).unwrap();
        assert_eq!(db.model_versions(Some("j1")).unwrap().len(), 1);
        assert_eq!(db.model_of("j1").unwrap(), Some((4, PathBuf::from("/m/round-4"))));
        // A deployed version outlives retention, and so does the rest of
        // its service's history.
        let deployment = |seq: u64| StoredDeployment {
            service: "triage".into(),
            sequence: seq,
            record: vec![1],
            signature: vec![2],
            admin_certificate: vec![3],
            grant: None,
            created_at: 5,
        };
        let newest = *kept.first().unwrap();
        db.add_deployment(&deployment(1), "j1", newest).unwrap();
        let e = db.add_deployment(&deployment(1), "j1", newest).unwrap_err().to_string();
        assert!(e.contains("not the next"), "{e}");
        let e = db.add_deployment(&deployment(2), "j1", 99).unwrap_err().to_string();
        assert!(e.contains("round 99"), "{e}");
        for r in 10..13 {
            let model = SavedModel { path: format!("/m/round-{r}").into(), sha256: format!("{r:064x}"), bytes: 1 };
            db.save_checkpoint("j1", r, Some(&model), None, None).unwrap();
        }
        let gone = db.forget_model_versions("j1", 2).unwrap();
        assert!(!gone.contains(&PathBuf::from(format!("/m/round-{newest}"))), "{gone:?}");
        assert!(db.model_version("j1", newest).unwrap().is_some());
        assert_eq!(db.services_of("j1", newest).unwrap(), vec!["triage".to_string()]);
        assert_eq!(db.deployments(Some("triage")).unwrap().len(), 1);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", 99).unwrap();
        assert!(Db::open(&path).is_err());
    }

    /// A relay delegation's nonce is admitted once, across reopenings of
    /// the database (a coordinator restart), and forgotten only once its
    /// time is out of range anyway.
    #[test]
    fn a_delegation_nonce_is_admitted_once_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let nonce = [7u8; 16];
        assert!(Db::open(&path).unwrap().first_use_of_nonce(&nonce, 1000, 600).unwrap());
        let db = Db::open(&path).unwrap();
        assert!(!db.first_use_of_nonce(&nonce, 1100, 600).unwrap());
        assert!(db.first_use_of_nonce(&[8u8; 16], 1100, 600).unwrap());
        assert!(db.first_use_of_nonce(&nonce, 1601, 600).unwrap(), "forgotten once out of range");
    }
}
