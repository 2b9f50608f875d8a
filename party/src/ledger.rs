//! The hospital's privacy ledger: what each of its data sets has spent in
//! record-level (ε, δ), kept by the party itself, never by the coordinator.
//!
//! * **Before accepting a job** the party computes from the spec what the
//!   whole job will cost the data set (a job without DP costs ε = ∞) and
//!   refuses it if the data set's spending would pass `policy.max_epsilon`
//!   (or its summed δ `policy.max_delta`).
//! * **On acceptance** it *reserves* the whole job's cost in the ledger
//!   file (written to a temporary file, fsynced, renamed, directory
//!   fsynced; a directory the party creates for it has its parent
//!   fsynced, and its entry is synced again at every start) before it
//!   touches the data. A crash at any later point
//!   leaves at least what was spent on record: the ledger never
//!   under-counts. A job offered again (the coordinator resumed it) is not
//!   charged twice.
//! * **Before each round's training** it records the round as started,
//!   and nothing the round computes leaves the party before that record is
//!   durable. A round beyond the ones reserved (a coordinator that re-runs
//!   a round after a restart, or asks for more than the spec's) is charged
//!   first: the job's reservation grows to the ε of the rounds started, if
//!   the budget allows it, else the round is refused before any training.
//!   The record's write (two fsyncs) runs on a thread of its own while the
//!   round trains ([`RoundStarted`]): training spends nothing until its
//!   result is released, so the write need only precede the release.
//!
//! * **When the coordinator says the job ended** before its last round,
//!   the reservation is settled to what the rounds started cost
//!   ([`RoundGuard::settle`]); further rounds of it, if any came, would be
//!   charged one by one as above.
//!
//! Costs of separate jobs add up (basic composition of (ε, δ)): a
//! conservative total that needs no assumption on how the jobs relate.
//! One party process owns a ledger file: it holds an exclusive lock on
//! `LEDGER.lock` while the ledger is open, and a second process is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use confide_algorithms::TrainConfig;
use confide_proto::dpspec::DpSpec;
use confide_proto::durable;
use confide_proto::jobspec::JobSpec;
use serde::{Deserialize, Serialize};

/// The ledger in memory: its contents, and how many changes they hold.
#[derive(Debug, Default)]
struct State {
    file: LedgerFile,
    version: u64,
}

/// A round recorded as started in memory, whose durable write is under
/// way on a thread of its own. The round may train meanwhile; nothing it
/// computes may leave the party before [`RoundStarted::durable`] returns.
/// Dropped without it (a panic unwinding through the round), it waits for
/// the write all the same, so that whatever the unwinding sends leaves
/// after the record.
#[must_use = "the round's record must be durable before its result leaves the party"]
#[derive(Debug)]
pub struct RoundStarted(Option<std::thread::JoinHandle<Result<(), String>>>);

impl RoundStarted {
    /// Waits until the round's record is on disk; an error (the write
    /// failed) means the round's result must not be released.
    pub fn durable(mut self) -> Result<(), String> {
        match self.0.take() {
            None => Ok(()),
            Some(writer) => writer.join().unwrap_or_else(|_| Err("the privacy ledger's writer panicked".into())),
        }
    }
}

impl Drop for RoundStarted {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take() {
            let _ = writer.join();
        }
    }
}

/// Why a round (or a release) was not started: the coordinator asked for
/// more than the reservation and the budget allow (its fault), or the
/// ledger could not record it here (this party's: it refuses the task and
/// stays in the job).
#[derive(Debug, Clone, PartialEq)]
pub enum StartRefused {
    /// Beyond what the job may spend, or a release made already.
    Budget(String),
    /// This party left the job (over a coordinator fault, in another
    /// session of it).
    Left(String),
    /// The ledger's own failure.
    Ledger(String),
}

impl std::fmt::Display for StartRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartRefused::Budget(m) | StartRefused::Left(m) | StartRefused::Ledger(m) => f.write_str(m),
        }
    }
}

/// What one job reserved against one data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCharge {
    /// The job's name.
    pub name: String,
    /// ε reserved for the whole job (∞, written "inf", for a job without DP).
    #[serde(with = "finite_or_inf")]
    pub epsilon: f64,
    /// δ reserved for the whole job (a number in [0, 1]: a negative one,
    /// from a hand-edited file, would lower the data set's total).
    #[serde(deserialize_with = "delta_in_range")]
    pub delta: f64,
    /// Rounds the reservation covers.
    pub rounds_reserved: u32,
    /// Rounds whose training started at this party.
    pub rounds_started: u32,
    /// Unix seconds of acceptance.
    pub accepted_at: u64,
    /// What the cost was computed from (the spec's DP settings, rounds and
    /// schedule): a job offered again under the same id must match it.
    #[serde(default)]
    pub terms: String,
    /// Why this party left the job (a coordinator fault): the job is not
    /// rejoined, so an offer of it again under the same id is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left: Option<String>,
    /// How the coordinator said the job ended (`succeeded`, `failed`,
    /// `cancelled`), once the reservation was settled to the rounds it
    /// started ([`RoundGuard::settle`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

/// One data set's spending.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetLedger {
    /// Jobs by id.
    pub jobs: BTreeMap<String, JobCharge>,
    /// Where the data set's rows were read (resolved paths): a data set
    /// renamed in the configuration, or a new one over the same path, is
    /// charged with what this entry spent.
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub paths: std::collections::BTreeSet<String>,
}

impl DatasetLedger {
    /// Total ε reserved (basic composition).
    pub fn epsilon(&self) -> f64 {
        self.jobs.values().map(|j| j.epsilon).sum()
    }

    /// Total δ reserved.
    pub fn delta(&self) -> f64 {
        self.jobs.values().map(|j| j.delta).sum()
    }
}

/// The ledger file's contents.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LedgerFile {
    /// Format version (1).
    pub version: u32,
    /// Data sets by name.
    pub datasets: BTreeMap<String, DatasetLedger>,
}

impl LedgerFile {
    /// The ε the rows of data set `dataset` (read at `path`) have spent:
    /// its own entry's jobs and those of every entry that read the same
    /// path under another name, except job `skip` of `dataset`.
    pub fn spent_by_rows(&self, dataset: &str, path: Option<&str>, skip: Option<&str>) -> f64 {
        self.sum_by_rows(dataset, path, skip, |j| j.epsilon)
    }

    /// [`LedgerFile::spent_by_rows`] for δ.
    pub fn delta_by_rows(&self, dataset: &str, path: Option<&str>, skip: Option<&str>) -> f64 {
        self.sum_by_rows(dataset, path, skip, |j| j.delta)
    }

    fn sum_by_rows(&self, dataset: &str, path: Option<&str>, skip: Option<&str>, of: fn(&JobCharge) -> f64) -> f64 {
        self.datasets
            .iter()
            .filter(|(name, d)| *name == dataset || path.is_some_and(|p| d.paths.contains(p)))
            .flat_map(|(name, d)| {
                d.jobs.iter().filter(move |(id, _)| !(name == dataset && Some(id.as_str()) == skip)).map(|(_, j)| of(j))
            })
            // From +0 (an empty f64 sum is -0, which prints "-0.0000").
            .fold(0.0, |total, x| total + x)
    }

    /// The other names under which the rows at `path` spent budget.
    pub fn other_names_of(&self, dataset: &str, path: Option<&str>) -> Vec<&str> {
        self.datasets
            .iter()
            .filter(|(name, d)| *name != dataset && path.is_some_and(|p| d.paths.contains(p)) && !d.jobs.is_empty())
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

/// Everything a job's cost depends on, as text: the DP settings, the rounds
/// and the local schedule; under distributed noise also the mechanism's
/// version, since its calibration (and so ε) changed with the rotation in
/// blocks: a job reserved by an earlier binary is not resumed at the cost
/// that binary computed.
fn cost_terms(spec: &JobSpec) -> String {
    let distributed = spec.dp.as_ref().and_then(|dp| dp.ddg_config(1)).is_some();
    format!(
        "{:?} rounds={} training={:?}{}",
        spec.dp,
        spec.rounds,
        (spec.training.local_epochs, spec.training.batch_size),
        if distributed { format!(" ddg_rotation_block={}", confide_dp::ddg::ROTATION_BLOCK) } else { String::new() }
    )
}

/// Serde for ε: numbers, and "inf" for a job without DP (JSON has no ∞).
mod finite_or_inf {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() { s.serialize_f64(*v) } else { s.serialize_str("inf") }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Number(f64),
            Text(String),
        }
        match Value::deserialize(d)? {
            Value::Number(x) if x.is_finite() && x >= 0.0 => Ok(x),
            Value::Text(t) if t == "inf" => Ok(f64::INFINITY),
            _ => Err(serde::de::Error::custom("ε must be a non-negative number or \"inf\"")),
        }
    }
}

fn delta_in_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let delta = f64::deserialize(d)?;
    if (0.0..=1.0).contains(&delta) {
        Ok(delta)
    } else {
        Err(serde::de::Error::custom(format!("δ must be in [0, 1] (got {delta})")))
    }
}

/// What a job would cost a data set, from its spec alone.
pub fn job_cost(spec: &JobSpec) -> (f64, f64) {
    match &spec.dp {
        // Per record: at party level, more than the party-level ε the job states.
        Some(dp) => (fail_closed(dp.record_epsilon(&spec.training, spec.rounds)), dp.delta),
        None => (f64::INFINITY, 0.0),
    }
}

/// An ε the accountant could not compute (NaN) counts as ∞: every budget
/// check then refuses, where a NaN would pass every comparison.
fn fail_closed(epsilon: f64) -> f64 {
    if epsilon.is_nan() { f64::INFINITY } else { epsilon }
}

/// Whether a total spending is within `max` (to a relative 10⁻¹²: sums of
/// the same costs in another order); false for NaN, which fails closed.
fn within_budget(total: f64, max: f64) -> bool {
    total <= max * (1.0 + 1e-12)
}

/// What a data set's rows may spend in all (`policy.max_epsilon`,
/// `policy.max_delta`); `None`: no limit. An `Option<f64>` is an ε limit
/// alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// The most ε (basic composition across jobs).
    pub epsilon: Option<f64>,
    /// The most δ (summed across jobs).
    pub delta: Option<f64>,
    /// Training rounds a job may run beyond its spec's (`policy.max_extra_rounds`).
    pub extra_rounds: u32,
}

/// Training rounds a job may run beyond its spec's by default.
pub const DEFAULT_EXTRA_ROUNDS: u32 = 4;

impl Default for Budget {
    fn default() -> Self {
        Budget::from(None)
    }
}

impl From<Option<f64>> for Budget {
    fn from(epsilon: Option<f64>) -> Self {
        Budget { epsilon, delta: None, extra_rounds: DEFAULT_EXTRA_ROUNDS }
    }
}

/// The ledger of one party, shared by its jobs.
#[derive(Debug)]
pub struct Ledger {
    path: PathBuf,
    state: Mutex<State>,
    /// The latest [`State::version`] on disk; held while writing, so that
    /// writes (from the rounds' writer threads and from reservations) run
    /// one at a time and never replace a newer state with an older one.
    written: Mutex<u64>,
    /// An exclusive lock on `PATH.lock`, held while the ledger is open: a
    /// second process on the same ledger would overwrite this one's
    /// reservations.
    _lock: std::fs::File,
    /// Tests slow this ledger's writes to check that nothing waits on them
    /// by luck.
    #[cfg(test)]
    pub(crate) write_delay_ms: std::sync::atomic::AtomicU64,
}

impl Ledger {
    /// Opens the ledger at `path` (an absent file is an empty ledger; an
    /// unreadable or malformed one is an error naming the file, never
    /// silently reset).
    pub fn open(path: &Path) -> Result<Arc<Ledger>, String> {
        let lock_path = path.with_extension("lock");
        let dir = lock_path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        create_dirs(dir)?;
        // Made by an earlier run that crashed before syncing its entry:
        // durable now, before anything is recorded in it.
        durable::sync_parent(dir, &mut durable_step)?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("{}: {e}", lock_path.display()))?;
        lock.try_lock().map_err(|e| {
            format!(
                "privacy ledger {} is in use by another process ({e}); one party process owns a ledger",
                path.display()
            )
        })?;
        let file = Self::read(path)?;
        Ok(Arc::new(Ledger {
            path: path.to_owned(),
            state: Mutex::new(State { file, version: 0 }),
            written: Mutex::new(0),
            _lock: lock,
            #[cfg(test)]
            write_delay_ms: Default::default(),
        }))
    }

    /// The ledger's contents, read without taking it (for display while a
    /// party runs); an absent file is an empty ledger.
    pub fn read(path: &Path) -> Result<LedgerFile, String> {
        Ok(match std::fs::read_to_string(path) {
            Ok(text) => {
                let file: LedgerFile = serde_json::from_str(&text)
                    .map_err(|e| format!("{}: not a privacy ledger: {e}", path.display()))?;
                if file.version != 1 {
                    return Err(format!("{}: ledger version {} (this party reads 1)", path.display(), file.version));
                }
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerFile { version: 1, ..LedgerFile::default() },
            Err(e) => return Err(format!("{}: {e}", path.display())),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of the contents.
    pub fn snapshot(&self) -> LedgerFile {
        self.state.lock().map(|s| s.file.clone()).unwrap_or_default()
    }

    /// Reserves `spec`'s cost for `job_id` against `dataset` if it fits
    /// `budget` (ε and δ), durably; returns the guard the job's rounds go
    /// through. Already reserved (an offer of the same job again): the
    /// existing reservation.
    pub fn reserve(
        self: &Arc<Self>,
        job_id: &str,
        spec: &JobSpec,
        dataset: &str,
        budget: impl Into<Budget>,
    ) -> Result<RoundGuard, String> {
        self.reserve_at(job_id, spec, dataset, None, budget)
    }

    /// [`Ledger::reserve`] for a data set whose rows are read at `path`
    /// (resolved): the budget counts what every entry that read that path
    /// spent, whatever its name (a data set renamed in the configuration
    /// keeps its spending), and the entry records the path.
    pub fn reserve_at(
        self: &Arc<Self>,
        job_id: &str,
        spec: &JobSpec,
        dataset: &str,
        path: Option<&Path>,
        budget: impl Into<Budget>,
    ) -> Result<RoundGuard, String> {
        let Budget { epsilon: max_epsilon, delta: max_delta, extra_rounds } = budget.into();
        let path = path.map(|p| p.to_string_lossy().into_owned());
        let (epsilon, delta) = job_cost(spec);
        let mut state = self.state.lock().map_err(|_| "the privacy ledger's lock is poisoned".to_string())?;
        let entry = state.file.datasets.get(dataset).cloned().unwrap_or_default();
        let guard = |accounts: bool, resumed: bool| RoundGuard {
            ledger: self.clone(),
            dataset: dataset.to_owned(),
            job_id: job_id.to_owned(),
            accounts,
            resumed,
            max_epsilon,
            most_rounds: spec.rounds.saturating_add(extra_rounds),
            cost: spec.dp.clone().map(|dp| (dp, spec.training.clone())),
            path: path.clone(),
        };
        if let Some(existing) = entry.jobs.get(job_id) {
            if let Some(why) = &existing.left {
                return Err(format!("this party left job {job_id} and does not rejoin it: {why}"));
            }
            // Offered again (the coordinator resumed it): the reservation
            // holds only for the terms it was computed from.
            if existing.terms != cost_terms(spec) {
                return Err(format!(
                    "job {job_id} was accepted for data set {dataset:?} with other privacy terms; a job cannot \
                     change its DP settings, rounds or schedule once accepted"
                ));
            }
            // The rows the name reads now may have spent under other
            // names since (a data set pointed elsewhere): the reservation
            // holds only while their whole spending is within the budget.
            if let Some(max) = max_epsilon {
                let spent = state.file.spent_by_rows(dataset, path.as_deref(), None);
                if !within_budget(spent, max) {
                    let also = if state.file.other_names_of(dataset, path.as_deref()).is_empty() {
                        ""
                    } else {
                        " (under other names as well)"
                    };
                    return Err(format!(
                        "job {job_id} was accepted for data set {dataset:?}, whose rows have spent ε = {spent:.4} \
                         in all{also}, above the policy's {max}"
                    ));
                }
            }
            if let Some(max) = max_delta {
                let spent = state.file.delta_by_rows(dataset, path.as_deref(), None);
                if !within_budget(spent, max) {
                    return Err(format!(
                        "job {job_id} was accepted for data set {dataset:?}, whose rows have spent δ = {spent:e} \
                         in all, above the policy's max_delta {max:e}"
                    ));
                }
            }
            if let Some(p) = &path
                && !entry.paths.contains(p)
            {
                // The data set now reads another path: its spending
                // follows the rows there too.
                let mut next = state.file.clone();
                next.datasets.entry(dataset.to_owned()).or_default().paths.insert(p.clone());
                self.commit(&mut state, next)?;
            }
            return Ok(guard(spec.dp.is_some(), true));
        }
        if let Some(max) = max_epsilon {
            let spent = state.file.spent_by_rows(dataset, path.as_deref(), None);
            if !epsilon.is_finite() {
                return Err(format!(
                    "policy limits data set {dataset:?} to ε = {max}; this job has no differential privacy, \
                     so it would cost ε = ∞"
                ));
            }
            if !within_budget(spent + epsilon, max) {
                // The other names stay here (the reason reaches the
                // coordinator): only that there are some.
                let also = if state.file.other_names_of(dataset, path.as_deref()).is_empty() {
                    ""
                } else {
                    " (its rows, under other names as well)"
                };
                return Err(format!(
                    "data set {dataset:?} has spent ε = {spent:.4}{also} of the policy's {max}; this job would cost \
                     ε = {epsilon:.4} (δ = {delta:e}), so {:.4} in all",
                    spent + epsilon
                ));
            }
        }
        if let Some(max) = max_delta {
            let spent = state.file.delta_by_rows(dataset, path.as_deref(), None);
            if !within_budget(spent + delta, max) {
                return Err(format!(
                    "data set {dataset:?} has spent δ = {spent:e} of the policy's max_delta {max:e}; this job's \
                     δ = {delta:e} would make it {:e}",
                    spent + delta
                ));
            }
        }
        let mut next = state.file.clone();
        let record = next.datasets.entry(dataset.to_owned()).or_default();
        record.paths.extend(path.clone());
        record.jobs.insert(
            job_id.to_owned(),
            JobCharge {
                name: spec.name.clone(),
                epsilon,
                delta,
                rounds_reserved: spec.rounds,
                rounds_started: 0,
                accepted_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                terms: cost_terms(spec),
                left: None,
                ended: None,
            },
        );
        // Durable before the job is accepted (the state lock held: no other
        // change comes between).
        self.commit(&mut state, next)?;
        // A job without DP is on record (its data set has then spent ε = ∞);
        // its rounds are not counted. A DP job's are, even where its ε
        // could not be computed (∞).
        Ok(guard(spec.dp.is_some(), false))
    }

    /// Records where each named data set reads its rows (resolved paths),
    /// for the entries the ledger has: at start, so that an entry written
    /// before paths were kept, or a data set pointed elsewhere since, links
    /// its spending to the rows' path before the data set is renamed. One
    /// durable write if anything changed.
    pub fn record_paths(&self, paths: &[(&str, &Path)]) -> Result<(), String> {
        let mut state = self.state.lock().map_err(|_| "the privacy ledger's lock is poisoned".to_string())?;
        let mut next = state.file.clone();
        let mut changed = false;
        for (name, path) in paths {
            if let Some(d) = next.datasets.get_mut(*name) {
                changed |= d.paths.insert(path.to_string_lossy().into_owned());
            }
        }
        if !changed {
            return Ok(());
        }
        self.commit(&mut state, next)
    }

    fn leave(&self, dataset: &str, job_id: &str, why: &str) -> Result<(), String> {
        let mut state = self.state.lock().map_err(|_| "the privacy ledger's lock is poisoned".to_string())?;
        let mut next = state.file.clone();
        let Some(charge) = next.datasets.get_mut(dataset).and_then(|d| d.jobs.get_mut(job_id)) else {
            return Err(format!(
                "privacy ledger {}: no reservation for job {job_id} on data set {dataset:?}",
                self.path.display()
            ));
        };
        if charge.left.is_some() {
            // The first reason stands; if its write failed, it is retried.
            return self.write_version(&state.file, state.version);
        }
        charge.left = Some(why.to_owned());
        // Kept in memory even if the write fails (this process then refuses
        // the job; the next write that succeeds carries it to disk).
        let written = self.write_version(&next, state.version + 1);
        state.file = next;
        state.version += 1;
        written
    }

    fn settle(&self, guard: &RoundGuard, ended: &str) -> Result<Option<f64>, String> {
        let Some((dp, training)) = &guard.cost else { return Ok(None) };
        let mut state = self.state.lock().map_err(|_| "the privacy ledger's lock is poisoned".to_string())?;
        let mut next = state.file.clone();
        let Some(charge) = next.datasets.get_mut(&guard.dataset).and_then(|d| d.jobs.get_mut(&guard.job_id)) else {
            return Ok(None);
        };
        if charge.rounds_started >= charge.rounds_reserved || !charge.epsilon.is_finite() {
            return Ok(None);
        }
        // Only a reservation this binary's accountant made is recomputed: a
        // charge recorded otherwise (another binary's accountant, a hand
        // edit) is not taken back, as a grown charge never is.
        let reserved = fail_closed(dp.record_epsilon(training, charge.rounds_reserved));
        if (charge.epsilon - reserved).abs() > reserved * 1e-12 {
            return Ok(None);
        }
        // What the started rounds cost (none: nothing left the party), never
        // above what is recorded.
        let spent = match charge.rounds_started {
            0 => 0.0,
            n => fail_closed(dp.record_epsilon(training, n)),
        };
        if spent >= charge.epsilon {
            return Ok(None);
        }
        charge.epsilon = spent;
        charge.rounds_reserved = charge.rounds_started;
        charge.ended = Some(ended.chars().take(16).collect());
        self.commit(&mut state, next)?;
        Ok(Some(spent))
    }

    fn start_round(self: &Arc<Self>, guard: &RoundGuard, once: bool) -> Result<RoundStarted, StartRefused> {
        let (dataset, job_id) = (guard.dataset.as_str(), guard.job_id.as_str());
        let local = StartRefused::Ledger;
        let mut state = self.state.lock().map_err(|_| local("the privacy ledger's lock is poisoned".to_string()))?;
        let mut next = state.file.clone();
        // (Sent to the coordinator as a refusal: no local path in it.)
        let missing = || local(format!("the privacy ledger has no reservation for job {job_id}"));
        let others = next.spent_by_rows(dataset, guard.path.as_deref(), Some(job_id));
        let d = next.datasets.get_mut(dataset).ok_or_else(missing)?;
        let charge = d.jobs.get_mut(job_id).ok_or_else(missing)?;
        if let Some(why) = &charge.left {
            // A session that began before another left the job.
            return Err(StartRefused::Left(format!("this party left job {job_id}: {why}")));
        }
        if once && charge.rounds_started > 0 {
            // Checked and counted under the one lock: two sessions of the
            // job cannot both pass.
            return Err(StartRefused::Budget(format!("job {job_id} made its one release already")));
        }
        if charge.rounds_started >= charge.rounds_reserved {
            // A round beyond the reservation: charged before it runs.
            let Some((dp, training)) = &guard.cost else {
                return Err(local(format!("job {job_id} has no DP cost to extend its reservation with")));
            };
            let rounds = charge.rounds_started + 1;
            if rounds > guard.most_rounds {
                return Err(StartRefused::Budget(format!(
                    "the coordinator asked for training round {rounds} of a job reserved for {} rounds; this party \
                     runs at most {} (policy.max_extra_rounds beyond the spec's)",
                    charge.rounds_reserved, guard.most_rounds
                )));
            }
            // Never below what is recorded: one more round costs more, and
            // a recorded charge (another binary's accountant, say) is not
            // taken back by a recomputation.
            let epsilon = fail_closed(dp.record_epsilon(training, rounds)).max(fail_closed(charge.epsilon));
            if let Some(max) = guard.max_epsilon
                && !within_budget(others + epsilon, max)
            {
                return Err(StartRefused::Budget(format!(
                    "the coordinator asked for training round {rounds} of a job reserved for {} rounds; for data set \
                     {dataset:?} that would cost ε = {epsilon:.4}, {:.4} in all, above the policy's {max}",
                    charge.rounds_reserved,
                    others + epsilon
                )));
            }
            charge.epsilon = epsilon;
            charge.rounds_reserved = rounds;
            // A settled job that goes on is no longer settled.
            charge.ended = None;
        }
        charge.rounds_started += 1;
        // In memory at once (a later round or reservation counts it), on
        // disk by the writer thread. A failed write fails the round, and
        // the count stays: over-counting is the safe side.
        let next = Arc::new(next);
        state.file = LedgerFile::clone(&next);
        state.version += 1;
        let version = state.version;
        drop(state);
        let (ledger, snapshot) = (self.clone(), next.clone());
        match std::thread::Builder::new()
            .name("privacy-ledger".into())
            .spawn(move || ledger.write_version(&snapshot, version))
        {
            Ok(writer) => Ok(RoundStarted(Some(writer))),
            // No thread to be had: written here, before training.
            Err(_) => self.write_version(&next, version).map(|()| RoundStarted(None)).map_err(local),
        }
    }

    /// Writes `file`, the state at `version`, unless a later state is
    /// already on disk (it holds this one's changes: each version is made
    /// from the one before it in memory, under the state lock, so a later
    /// one carries every earlier change, a settlement's lowered charge
    /// with the rounds started before it).
    /// Makes `next` the ledger: durable first, then in memory (a change
    /// whose write failed does not hold). The state lock is held by the
    /// caller, so no other change comes between.
    fn commit(&self, state: &mut State, next: LedgerFile) -> Result<(), String> {
        self.write_version(&next, state.version + 1)?;
        state.file = next;
        state.version += 1;
        Ok(())
    }

    fn write_version(&self, file: &LedgerFile, version: u64) -> Result<(), String> {
        #[cfg(test)]
        std::thread::sleep(std::time::Duration::from_millis(
            self.write_delay_ms.load(std::sync::atomic::Ordering::Relaxed),
        ));
        let mut written = self.written.lock().map_err(|_| "the privacy ledger's lock is poisoned".to_string())?;
        if *written >= version {
            return Ok(());
        }
        // The detail (the file's path, the OS's error) stays in this
        // party's log: the message may go to the coordinator as a refusal.
        self.write(file).map_err(|e| {
            tracing::warn!("{e}");
            "the privacy ledger could not be written (the detail is in this party's log)".to_string()
        })?;
        *written = version;
        Ok(())
    }

    /// Writes durably: temporary file, fsync, rename, fsync of the directory.
    fn write(&self, file: &LedgerFile) -> Result<(), String> {
        let fail = |e: std::io::Error| format!("privacy ledger {}: {e}", self.path.display());
        let text = serde_json::to_string_pretty(file).map_err(|e| format!("privacy ledger: {e}"))?;
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        create_dirs(dir)?;
        let tmp = self.path.with_extension("json.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt as _;
            // The lock is held, so this name is ours; what a crash (or
            // anyone) left there is removed, not followed (a symlink
            // would be), and the new file is created 0600 (found by review).
            match std::fs::remove_file(&tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
                _ => {}
            }
            let mut f =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(fail)?;
            f.write_all(text.as_bytes()).map_err(fail)?;
            f.sync_all().map_err(fail)?;
            durable_step(format!("sync file {}", tmp.display()));
        }
        std::fs::rename(&tmp, &self.path).map_err(fail)?;
        durable_step(format!("rename {} -> {}", tmp.display(), self.path.display()));
        durable::sync_dir(dir, &mut durable_step).map_err(|e| format!("privacy ledger: {e}"))
    }
}

/// [`durable::create_dirs`], the error saying it is the ledger's.
fn create_dirs(dir: &Path) -> Result<(), String> {
    durable::create_dirs(dir, &mut durable_step).map_err(|e| format!("privacy ledger: {e}"))
}

/// The ledger's durable steps in the order taken, recorded in tests
/// (`the_write_order_makes_every_step_durable_before_the_next`): the
/// power-loss guarantee rests on that order, which a test can check but
/// not cause.
#[cfg(test)]
static DURABLE_STEPS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn durable_step(_step: String) {
    #[cfg(test)]
    if let Ok(mut steps) = DURABLE_STEPS.lock() {
        steps.push(_step);
    }
}

/// A job's reservation: each training round goes through it.
#[derive(Debug, Clone)]
pub struct RoundGuard {
    ledger: Arc<Ledger>,
    dataset: String,
    /// The job's id.
    job_id: String,
    /// Whether the job has rounds to account (it has DP). A flag, not a
    /// sentinel id: no job id a coordinator sends turns the count off.
    accounts: bool,
    /// The job was reserved before this offer (an offer of it again: a
    /// reconnect, or the coordinator resumed it).
    resumed: bool,
    max_epsilon: Option<f64>,
    /// The most training rounds the job may start: its spec's and the
    /// policy's extra ones.
    most_rounds: u32,
    /// What n rounds cost, to extend the reservation.
    cost: Option<(DpSpec, TrainConfig)>,
    /// Where the data set's rows are read (resolved), when known.
    path: Option<String>,
}

impl RoundGuard {
    /// Records a round's training as started, or refuses it when the
    /// reservation's rounds have all run and the budget cannot extend it.
    /// The record becomes durable while the round trains: the round's
    /// result may leave the party only once [`RoundStarted::durable`] says
    /// so.
    pub fn start_round(&self) -> Result<RoundStarted, StartRefused> {
        if !self.accounts {
            return Ok(RoundStarted(None));
        }
        self.ledger.start_round(self, false)
    }

    /// Whether the job was reserved before this offer of it: a session that
    /// continues one an earlier session took part in.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// [`RoundGuard::start_round`] for a job that releases once (a DP
    /// evaluation): refused if the ledger recorded a release of the job
    /// already, in this session or an earlier one.
    pub fn start_release_once(&self) -> Result<RoundStarted, StartRefused> {
        if !self.accounts {
            return Ok(RoundStarted(None));
        }
        self.ledger.start_round(self, true)
    }

    /// Settles the reservation once the coordinator says the job ended
    /// (`state`): a job that ends before its last round keeps on record
    /// what the rounds it started cost, not the whole job's reservation.
    /// Returns the settled ε when it went down. Nothing is taken back for
    /// a job without DP (its rows were read: ∞ stands), nor δ (kept as
    /// reserved). A job resumed after this (a coordinator that said it
    /// ended and offers it again) is charged round by round, as rounds
    /// beyond a reservation are. Durable before it returns.
    pub fn settle(&self, state: &str) -> Result<Option<f64>, String> {
        if !self.accounts {
            return Ok(None);
        }
        self.ledger.settle(self, state)
    }

    /// Records, durably, that this party left the job over a coordinator
    /// fault (`why`): an offer of the job again is refused.
    pub fn leave(&self, why: &str) -> Result<(), String> {
        self.ledger.leave(&self.dataset, &self.job_id, why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confide_proto::Limits;

    fn spec_text(rounds: u32, dp: bool) -> String {
        let dp = if dp { "[dp]\nnoise_multiplier = 1.0\nsampling_rate = 0.05\n" } else { "" };
        format!(
            "name = \"p\"\nkind = \"train\"\nrounds = {rounds}\n[parties]\nnames = [\"a\", \"b\", \"c\"]\n\
             dataset = \"d\"\n[model]\nkind = \"logistic_regression\"\nclasses = 2\nstandardize = false\n{dp}"
        )
    }

    fn spec(rounds: u32, dp: bool) -> JobSpec {
        JobSpec::parse(&spec_text(rounds, dp), "t", &Limits::default()).unwrap()
    }

    /// A ledger in a directory of its own (kept alive by the first value).
    fn temp_ledger() -> (tempfile::TempDir, PathBuf, Arc<Ledger>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let ledger = Ledger::open(&path).unwrap();
        (dir, path, ledger)
    }

    /// Whether a job's rounds are counted follows from whether it has DP,
    /// never from its id: a coordinator that names a DP job "" (the id that once meant
    /// "nothing to count") still has every round counted, and one beyond
    /// the reservation charged or refused, and its one release refused again.
    #[test]
    fn no_job_id_turns_the_round_count_off() {
        let (_dir, path, ledger) = temp_ledger();
        let one_round = job_cost(&spec(1, true)).0;
        let guard = ledger.reserve("", &spec(1, true), "d", Some(one_round * (1.0 + 1e-9))).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        let e = guard.start_round().err().unwrap();
        assert!(matches!(&e, StartRefused::Budget(m) if m.contains("round 2 of a job reserved for 1")), "{e:?}");
        assert_eq!(Ledger::read(&path).unwrap().datasets["d"].jobs[""].rounds_started, 1);
        guard.start_release_once().err().unwrap();
        // A job without DP has nothing to count, whatever its id.
        let plain = ledger.reserve("x", &spec(1, false), "e", None).unwrap();
        for _ in 0..3 {
            plain.start_round().unwrap().durable().unwrap();
        }
        assert_eq!(Ledger::read(&path).unwrap().datasets["e"].jobs["x"].rounds_started, 0);
    }

    /// A job the coordinator says ended before its last round keeps on
    /// record what its started rounds cost, durably, and no more: the
    /// rest of its reservation goes back to the data set's budget. It
    /// never goes up, a job without DP keeps ∞, and a job resumed after
    /// (a coordinator that said it ended and goes on) is charged round by
    /// round against the budget, from what the started rounds cost.
    #[test]
    fn a_job_that_ended_early_keeps_only_its_started_rounds_on_record() {
        let (_dir, path, ledger) = temp_ledger();
        let ten = spec(10, true);
        let (whole, dp) = (job_cost(&ten).0, ten.dp.clone().unwrap());
        let budget = whole * 1.01;
        let guard = ledger.reserve("j", &ten, "d", Some(budget)).unwrap();
        for _ in 0..3 {
            guard.start_round().unwrap().durable().unwrap();
        }
        let three = dp.record_epsilon(&ten.training, 3);
        assert!(three < whole * 0.8, "{three} vs {whole}");
        assert_eq!(guard.settle("cancelled").unwrap(), Some(three));
        let on_disk = Ledger::read(&path).unwrap();
        let charge = &on_disk.datasets["d"].jobs["j"];
        assert_eq!((charge.epsilon, charge.rounds_reserved, charge.rounds_started), (three, 3, 3));
        assert_eq!(charge.ended.as_deref(), Some("cancelled"));
        assert_eq!(charge.delta, dp.delta, "δ stays as reserved");
        assert_eq!(on_disk.datasets["d"].epsilon(), three);
        // Settled once: again, nothing changes.
        assert_eq!(guard.settle("cancelled").unwrap(), None);
        // What it gave back is the budget's again: a second job fits that
        // would not have before.
        let text = spec_text(1, true).replace("noise_multiplier = 1.0", "noise_multiplier = 3.0");
        let small = JobSpec::parse(&text, "t", &Limits::default()).unwrap();
        let cost = job_cost(&small).0;
        assert!(cost > budget - whole && cost <= budget - three, "{cost}: {whole}, {three}, {budget}");
        drop(ledger.reserve("k", &small, "d", Some(budget)).unwrap());
        // The same job resumed: each further round is charged first, and
        // refused once the budget is spent.
        let mut charged = 3;
        while guard.start_round().map(|r| r.durable().unwrap()).is_ok() {
            charged += 1;
            let now = Ledger::read(&path).unwrap().datasets["d"].jobs["j"].clone();
            assert_eq!((now.rounds_started, now.rounds_reserved), (charged, charged));
            assert_eq!(now.epsilon, fail_closed(dp.record_epsilon(&ten.training, charged)));
        }
        assert!(charged < 10, "the other job's spending leaves no room for the whole job: {charged}");
        // A job whose rounds all started, or without DP, settles to nothing new.
        let full = ledger.reserve("f", &spec(1, true), "e", None).unwrap();
        full.start_round().unwrap().durable().unwrap();
        assert_eq!(full.settle("succeeded").unwrap(), None);
        let plain = ledger.reserve("x", &spec(5, false), "g", None).unwrap();
        assert_eq!(plain.settle("failed").unwrap(), None);
        assert_eq!(Ledger::read(&path).unwrap().datasets["g"].jobs["x"].epsilon, f64::INFINITY);
        // A job that started no round costs nothing.
        let idle = ledger.reserve("i", &spec(5, true), "h", None).unwrap();
        assert_eq!(idle.settle("failed").unwrap(), Some(0.0));
        assert_eq!(Ledger::read(&path).unwrap().datasets["h"].jobs["i"].epsilon, 0.0);
    }

    /// A settled job that goes on shows as such: a round beyond the
    /// settlement clears its `ended` mark.
    #[test]
    fn a_settled_job_that_goes_on_is_no_longer_marked_ended() {
        let (_dir, path, ledger) = temp_ledger();
        let guard = ledger.reserve("j", &spec(5, true), "d", None).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        assert!(guard.settle("cancelled").unwrap().is_some());
        assert_eq!(Ledger::read(&path).unwrap().datasets["d"].jobs["j"].ended.as_deref(), Some("cancelled"));
        guard.start_round().unwrap().durable().unwrap();
        let charge = Ledger::read(&path).unwrap().datasets["d"].jobs["j"].clone();
        assert_eq!((charge.ended, charge.rounds_started, charge.rounds_reserved), (None, 2, 2));
    }

    /// A charge this binary's accountant did not make (a hand edit, an
    /// older binary's accountant) is not recomputed by a settlement, as a
    /// grown charge never takes one back.
    #[test]
    fn a_settlement_never_recomputes_a_charge_it_did_not_make() {
        let (_dir, path, ledger) = temp_ledger();
        drop(ledger.reserve("j", &spec(10, true), "d", None).unwrap());
        drop(ledger);
        let mut file = Ledger::read(&path).unwrap();
        file.datasets.get_mut("d").unwrap().jobs.get_mut("j").unwrap().epsilon = 50.0;
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let ledger = Ledger::open(&path).unwrap();
        let guard = ledger.reserve("j", &spec(10, true), "d", None).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        assert_eq!(guard.settle("failed").unwrap(), None);
        assert_eq!(Ledger::read(&path).unwrap().datasets["d"].jobs["j"].epsilon, 50.0);
    }

    /// A settlement that comes while a round's record is still being
    /// written keeps that round: the file on disk counts it and charges
    /// what the rounds started cost, the round's own later write changing
    /// nothing.
    #[test]
    fn a_settlement_during_a_rounds_write_keeps_the_round() {
        let (_dir, path, ledger) = temp_ledger();
        let ten = spec(10, true);
        let guard = ledger.reserve("j", &ten, "d", None).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        ledger.write_delay_ms.store(300, std::sync::atomic::Ordering::Relaxed);
        let pending = guard.start_round().unwrap();
        let settled = guard.settle("cancelled").unwrap();
        pending.durable().unwrap();
        let two = ten.dp.as_ref().unwrap().record_epsilon(&ten.training, 2);
        assert_eq!(settled, Some(two));
        let charge = Ledger::read(&path).unwrap().datasets["d"].jobs["j"].clone();
        assert_eq!((charge.rounds_started, charge.rounds_reserved, charge.epsilon), (2, 2, two));
    }

    /// An ε the accountant could not compute (NaN) counts as ∞, and no
    /// spending that is NaN or ∞ passes a budget: a NaN would pass every
    /// `>` comparison.
    #[test]
    fn an_epsilon_that_is_not_a_number_fails_closed() {
        assert_eq!(fail_closed(f64::NAN), f64::INFINITY);
        assert_eq!(fail_closed(2.5), 2.5);
        for spent in [f64::NAN, f64::INFINITY, 4.1] {
            assert!(!within_budget(spent, 4.0), "{spent}");
        }
        assert!(within_budget(4.0, 4.0));
        assert!(!within_budget(1.0, f64::NAN));
    }

    /// A ledger file whose δ is negative or above 1 (edited by hand) is
    /// refused when read, naming δ: a negative one would lower the total.
    #[test]
    fn a_ledger_with_a_delta_out_of_range_is_refused() {
        let (_dir, path, ledger) = temp_ledger();
        drop(ledger.reserve("j1", &spec(1, true), "d", None).unwrap());
        drop(ledger);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(Ledger::read(&path).is_ok());
        for bad in ["-1e-5", "2.0"] {
            let edited = text.replace("\"delta\": 0.00001", &format!("\"delta\": {bad}"));
            assert_ne!(edited, text, "the test edits the file's δ");
            std::fs::write(&path, edited).unwrap();
            let e = Ledger::read(&path).unwrap_err();
            assert!(e.contains("δ must be in [0, 1]"), "{bad}: {e}");
        }
    }

    /// `policy.max_delta` bounds the δ a data set's rows sum to across
    /// jobs, under every name that read them: a job that would pass it is
    /// refused at reservation, saying so, and a job offered again after
    /// the limit was lowered below what the rows spent is refused too.
    #[test]
    fn the_summed_delta_is_kept_within_max_delta() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(&dir.path().join("ledger.json")).unwrap();
        let job = spec(3, true);
        let (_, delta) = job_cost(&job);
        assert_eq!(delta, 1e-5);
        let rows = Path::new("/data/bc.csv");
        let budget = |d: f64| Budget { epsilon: None, delta: Some(d), extra_rounds: DEFAULT_EXTRA_ROUNDS };
        drop(ledger.reserve_at("j1", &job, "bc", Some(rows), budget(2.5e-5)).unwrap());
        drop(ledger.reserve_at("j2", &job, "other-name", Some(rows), budget(2.5e-5)).unwrap());
        let e = ledger.reserve_at("j3", &job, "bc", Some(rows), budget(2.5e-5)).err().unwrap();
        assert!(e.contains("spent δ = 2e-5 of the policy's max_delta 2.5e-5"), "{e}");
        assert!(ledger.reserve_at("j3", &job, "bc", Some(rows), budget(3e-5)).is_ok(), "within a larger limit");
        assert!(ledger.reserve_at("j1", &job, "bc", Some(rows), budget(3e-5)).is_ok(), "offered again");
        let e = ledger.reserve_at("j1", &job, "bc", Some(rows), budget(2e-5)).err().unwrap();
        assert!(e.contains("whose rows have spent δ = 3") && e.contains("max_delta 2e-5"), "{e}");
        // An ε limit alone (`Option<f64>`) leaves δ unlimited.
        assert!(ledger.reserve_at("j4", &job, "bc", Some(rows), Some(1e9)).is_ok());
    }

    /// A job this party left over a coordinator fault is not rejoined: the
    /// ledger keeps the reason, durably, and an offer of the job again (in
    /// this process or after a restart) is refused with it. A job without
    /// DP is on record too, so leaving it is kept the same way.
    #[test]
    fn a_job_this_party_left_is_not_rejoined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        for dp in [true, false] {
            let ledger = Ledger::open(&path).unwrap();
            let id = if dp { "dp-job" } else { "plain-job" };
            let guard = ledger.reserve(id, &spec(3, dp), "d", None).unwrap();
            assert!(ledger.reserve(id, &spec(3, dp), "d", None).is_ok(), "offered again before leaving");
            guard.leave("coordinator fault: a survivor set it should not have sent").unwrap();
            let e = ledger.reserve(id, &spec(3, dp), "d", None).err().unwrap();
            assert!(e.contains("left job") && e.contains("survivor set"), "{e}");
            drop((guard, ledger));
            let reopened = Ledger::open(&path).unwrap();
            let e = reopened.reserve(id, &spec(3, dp), "d", None).err().unwrap();
            assert!(e.contains("does not rejoin"), "after a restart: {e}");
        }
    }

    /// A data set renamed in the configuration (or a new name over the
    /// same path) is charged with what the old name spent on those rows;
    /// a data set at another path is not.
    #[test]
    fn the_same_rows_under_another_name_keep_their_spending() {
        let (_dir, path, ledger) = temp_ledger();
        let job = spec(3, true);
        let (eps, _) = job_cost(&job);
        let rows = Path::new("/data/bc.csv");
        ledger.reserve_at("j1", &job, "bc", Some(rows), Some(eps * 1.5)).unwrap();
        let e = ledger.reserve_at("j2", &job, "breast", Some(rows), Some(eps * 1.5)).err().unwrap();
        assert!(e.contains("has spent") && e.contains("\"breast\""), "{e}");
        drop(ledger);
        let reopened = Ledger::open(&path).unwrap();
        assert!(reopened.reserve_at("j2", &job, "breast", Some(rows), Some(eps * 1.5)).is_err(), "after a restart");
        let other = reopened.reserve_at("j3", &job, "digits", Some(Path::new("/data/digits.csv")), Some(eps * 1.5));
        assert!(other.is_ok(), "other rows");
        // A round beyond the reservation counts the old name's spending
        // too: room for one round beside it, not two.
        let one = spec(1, true);
        let (e1, e2) = (job_cost(&one).0, job_cost(&spec(2, true)).0);
        let max = eps + (e1 + e2) / 2.0;
        let guard = reopened.reserve_at("j4", &one, "renamed", Some(rows), Some(max)).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        match guard.start_round() {
            Err(StartRefused::Budget(why)) => assert!(why.contains("above the policy"), "{why}"),
            other => panic!("a second round fits only without the old name's spending: {other:?}"),
        }
        let file = Ledger::read(&path).unwrap();
        assert_eq!(file.datasets["renamed"].paths.iter().collect::<Vec<_>>(), ["/data/bc.csv"]);
        assert_eq!(file.other_names_of("renamed", Some("/data/bc.csv")), ["bc"]);
    }

    /// An entry written before paths were kept gets the path its name
    /// reads at start, so a rename after the upgrade keeps its spending.
    #[test]
    fn an_entry_without_a_path_gets_its_rows_path_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let job = spec(3, true);
        let (eps, _) = job_cost(&job);
        Ledger::open(&path).unwrap().reserve("j1", &job, "bc", None).unwrap();
        assert!(Ledger::read(&path).unwrap().datasets["bc"].paths.is_empty(), "an entry of the earlier kind");
        let rows = Path::new("/data/bc.csv");
        let ledger = Ledger::open(&path).unwrap();
        ledger.record_paths(&[("bc", rows), ("unknown", Path::new("/x"))]).unwrap();
        assert!(!Ledger::read(&path).unwrap().datasets.contains_key("unknown"), "no entry made for a name");
        let e = ledger.reserve_at("j2", &job, "breast", Some(rows), Some(eps * 1.5)).err().unwrap();
        assert!(e.contains("under other names as well") && !e.contains("bc"), "{e}");
        // A job reserved on these rows under another name, offered again
        // after they spent more elsewhere, is refused.
        let guard = ledger.reserve_at("j3", &job, "fresh", Some(Path::new("/data/other.csv")), None).unwrap();
        drop(guard);
        ledger.record_paths(&[("fresh", rows)]).unwrap();
        let e = ledger.reserve_at("j3", &job, "fresh", Some(rows), Some(eps * 1.5)).err().unwrap();
        assert!(e.contains("whose rows have spent"), "{e}");
        assert!(ledger.reserve_at("j3", &job, "fresh", Some(rows), Some(eps * 2.5)).is_ok(), "within the budget");
    }

    /// A session that began before another session of the job left it
    /// starts no further round or release (`StartRefused::Left`); the
    /// first reason stands; a leave whose write failed is written by the
    /// next leave, so a restart does not rejoin the job.
    #[test]
    fn leaving_stops_every_session_of_the_job_and_survives_a_failed_write() {
        let (dir, path, ledger) = temp_ledger();
        let first = ledger.reserve("j", &spec(3, true), "d", None).unwrap();
        let second = ledger.reserve("j", &spec(3, true), "d", None).unwrap();
        first.start_round().unwrap().durable().unwrap();
        // The write fails: its temporary file's name is taken by a directory.
        let blocker = path.with_extension("json.tmp");
        std::fs::create_dir(&blocker).unwrap();
        let e = first.leave("coordinator fault: first").unwrap_err();
        // Said without the file's path or the OS's words (the message can
        // reach the coordinator as a refusal; the detail is logged here).
        assert!(e.contains("could not be written") && !e.contains(dir.path().to_str().unwrap()), "{e}");
        let e = ledger.reserve("j2", &spec(3, true), "d", None).unwrap_err();
        assert!(e.contains("could not be written") && !e.contains("ledger.json"), "{e}");
        std::fs::remove_dir(&blocker).unwrap();
        for start in [RoundGuard::start_round, RoundGuard::start_release_once] {
            match start(&second) {
                Err(StartRefused::Left(why)) => assert!(why.contains("first"), "{why}"),
                other => panic!("expected Left, got {other:?}"),
            }
        }
        second.leave("coordinator fault: second").unwrap();
        drop((first, second, ledger));
        let e = Ledger::open(&path).unwrap().reserve("j", &spec(3, true), "d", None).err().unwrap();
        assert!(e.contains("does not rejoin") && e.contains("first") && !e.contains("second"), "{e}");
    }

    #[test]
    fn reserves_durably_refuses_over_budget_and_counts_rounds() {
        let (_dir, path, ledger) = temp_ledger();
        let job = spec(3, true);
        let (eps, delta) = job_cost(&job);
        assert!(eps.is_finite() && eps > 0.0 && delta == 1e-5);
        let guard = ledger.reserve("j1", &job, "d", Some(eps * 2.05)).unwrap();
        // Durable at once: a new process reading the file sees the reservation.
        let reread = Ledger::read(&path).unwrap();
        assert_eq!(reread.datasets["d"].jobs["j1"].epsilon, eps);
        // The same job again is not charged twice; another fits once more, not twice.
        ledger.reserve("j1", &job, "d", Some(eps * 2.05)).unwrap();
        // The same id with cheaper-looking terms is refused, not matched to
        // the old reservation (the coordinator cannot swap the spec).
        let e = ledger.reserve("j1", &spec(30, true), "d", None).unwrap_err();
        assert!(e.contains("other privacy terms"), "{e}");
        // Other DP settings or another schedule under the same id, likewise.
        let retuned = |from: &str, to: &str| {
            let text = spec_text(3, true).replace(from, to);
            JobSpec::parse(&text, "t", &Limits::default()).unwrap()
        };
        for (from, to) in [
            ("noise_multiplier = 1.0", "noise_multiplier = 4.0"),
            ("sampling_rate = 0.05", "sampling_rate = 0.01"),
            (
                "rounds = 3",
                "rounds = 3
[training]
local_epochs = 2",
            ),
        ] {
            let e = ledger.reserve("j1", &retuned(from, to), "d", None).unwrap_err();
            assert!(e.contains("other privacy terms"), "{to}: {e}");
        }
        ledger.reserve("j2", &job, "d", Some(eps * 2.05)).unwrap();
        let e = ledger.reserve("j3", &job, "d", Some(eps * 2.05)).unwrap_err();
        assert!(e.contains("has spent") && e.contains("\"d\""), "{e}");
        // Other data sets have their own budget; a job without DP costs ∞:
        // refused under a limit, recorded as ∞ (and read back) without one.
        ledger.reserve("j3", &job, "other", Some(eps * 2.05)).unwrap();
        let e = ledger.reserve("j4", &spec(3, false), "d", Some(100.0)).unwrap_err();
        assert!(e.contains("ε = ∞"), "{e}");
        ledger.reserve("j5", &spec(3, false), "plain", None).unwrap().start_round().unwrap().durable().unwrap();
        assert_eq!(Ledger::read(&path).unwrap().datasets["plain"].epsilon(), f64::INFINITY);
        // Rounds: three reserved; the count survives a restart; a fourth
        // (a re-run) is charged first, and refused when the budget is spent.
        for _ in 0..2 {
            guard.start_round().unwrap().durable().unwrap();
        }
        // One process owns the ledger: a second open is refused until the first closes.
        let e = Ledger::open(&path).unwrap_err();
        assert!(e.contains("in use by another process"), "{e}");
        drop((guard, ledger));
        let reopened = Ledger::open(&path).unwrap();
        let again = reopened.reserve("j1", &job, "d", Some(eps * 2.05)).unwrap();
        again.start_round().unwrap().durable().unwrap();
        let e = again.start_round().unwrap_err();
        assert!(
            matches!(&e, StartRefused::Budget(m) if m.contains("round 4") && m.contains("above the policy")),
            "{e}"
        );
        assert_eq!(reopened.snapshot().datasets["d"].jobs["j1"].rounds_started, 3);
        let unlimited = reopened.reserve("j1", &job, "d", None).unwrap();
        unlimited.start_round().unwrap().durable().unwrap();
        let charged = reopened.snapshot().datasets["d"].jobs["j1"].clone();
        let four = job.dp.as_ref().unwrap().epsilon(&job.training, 4);
        assert_eq!((charged.rounds_started, charged.rounds_reserved, charged.epsilon), (4, 4, four));
        assert!(four > eps);
        assert!((reopened.snapshot().datasets["d"].epsilon() - eps - four).abs() < 1e-12, "j1 and j2");
    }

    /// A coordinator cannot grow a job's ε round by round: beyond the spec's
    /// rounds a party starts at most `policy.max_extra_rounds` more (each
    /// charged first), even without a limit on ε, and the count holds
    /// across a reopening (a new session of the job).
    #[test]
    fn rounds_beyond_the_spec_stop_at_the_policys_extra_rounds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let job = spec(2, true);
        let budget = Budget { epsilon: None, delta: None, extra_rounds: 1 };
        {
            let ledger = Ledger::open(&path).unwrap();
            let guard = ledger.reserve_at("j1", &job, "d", None, budget).unwrap();
            for _ in 0..2 {
                guard.start_round().unwrap().durable().unwrap();
            }
        }
        let ledger = Ledger::open(&path).unwrap();
        let guard = ledger.reserve_at("j1", &job, "d", None, budget).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        let e = guard.start_round().unwrap_err();
        assert!(
            matches!(&e, StartRefused::Budget(m) if m.contains("round 4") && m.contains("policy.max_extra_rounds")),
            "{e}"
        );
        assert_eq!(ledger.snapshot().datasets["d"].jobs["j1"].rounds_started, 3);
    }

    /// A round beyond the reservation is charged at the larger of what it
    /// costs and what is recorded: a recorded charge (from another
    /// binary's accountant, say) is never lowered by a recomputation.
    #[test]
    fn a_round_beyond_the_reservation_never_lowers_the_recorded_charge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let job = spec(1, true);
        {
            let ledger = Ledger::open(&path).unwrap();
            let guard = ledger.reserve("j1", &job, "d", None).unwrap();
            guard.start_round().unwrap().durable().unwrap();
        }
        let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file["datasets"]["d"]["jobs"]["j1"]["epsilon"] = serde_json::json!(50.0);
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let ledger = Ledger::open(&path).unwrap();
        let guard = ledger.reserve("j1", &job, "d", None).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        let charged = ledger.snapshot().datasets["d"].jobs["j1"].clone();
        let two = job.dp.as_ref().unwrap().epsilon(&job.training, 2);
        assert!(two < 50.0);
        assert_eq!((charged.rounds_started, charged.epsilon), (2, 50.0));
        // Read back as charged.
        drop((guard, ledger));
        assert_eq!(Ledger::read(&path).unwrap().datasets["d"].jobs["j1"].epsilon, 50.0);
    }

    /// Writes run one at a time and never put an older state over a newer
    /// one: a writer thread that comes late (its state already covered by
    /// a later write, here a reservation's) writes nothing.
    #[test]
    fn a_late_write_never_replaces_a_newer_state() {
        let (dir, path, ledger) = temp_ledger();
        let mut older = LedgerFile { version: 1, ..LedgerFile::default() };
        older.datasets.insert("old".into(), DatasetLedger::default());
        let mut newer = LedgerFile { version: 1, ..LedgerFile::default() };
        newer.datasets.insert("new".into(), DatasetLedger::default());
        ledger.write_version(&newer, 2).unwrap();
        ledger.write_version(&older, 1).unwrap();
        assert_eq!(Ledger::read(&path).unwrap(), newer);
        // A round started and a job reserved meanwhile: the file ends with
        // both (a ledger of its own, whose versions are its own).
        drop(ledger);
        let path = dir.path().join("second.json");
        let ledger = Ledger::open(&path).unwrap();
        let job = spec(3, true);
        let guard = ledger.reserve("j1", &job, "d", None).unwrap();
        let started = guard.start_round().unwrap();
        ledger.reserve("j2", &job, "e", None).unwrap();
        started.durable().unwrap();
        guard.start_round().unwrap().durable().unwrap();
        let on_disk = Ledger::read(&path).unwrap();
        assert_eq!(on_disk.datasets["d"].jobs["j1"].rounds_started, 2);
        assert!(on_disk.datasets["e"].jobs.contains_key("j2"));
        assert_eq!(on_disk, ledger.snapshot());
    }

    /// Under distributed noise the terms name the rotation's block: a job
    /// reserved by a binary that rotated differently (whose terms lack it)
    /// is refused on resume, not continued at that binary's cost; a DP-SGD
    /// job's terms are unchanged.
    #[test]
    fn a_distributed_dp_job_reserved_under_another_rotation_is_not_resumed() {
        let text = spec_text(3, false)
            + "[aggregation]\nprotocol = \"secagg\"\n[dp]\nlevel = \"party\"\nnoise_multiplier = 1.0\nupdate_clip = 1.0\n";
        let job = JobSpec::parse(&text, "t", &Limits::default()).unwrap();
        let terms = cost_terms(&job);
        assert!(terms.ends_with(&format!(" ddg_rotation_block={}", confide_dp::ddg::ROTATION_BLOCK)), "{terms}");
        assert!(!cost_terms(&spec(3, true)).contains("ddg_rotation_block"));
        let (_dir, path, ledger) = temp_ledger();
        ledger.reserve("j1", &job, "d", None).unwrap();
        drop(ledger);
        // The reservation as the binary before wrote it.
        let mut file = Ledger::read(&path).unwrap();
        let charge = file.datasets.get_mut("d").unwrap().jobs.get_mut("j1").unwrap();
        charge.terms = terms.split(" ddg_rotation_block").next().unwrap().to_string();
        std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
        let e = Ledger::open(&path).unwrap().reserve("j1", &job, "d", None).unwrap_err();
        assert!(e.contains("other privacy terms"), "{e}");
    }

    /// The durable steps taken under `root` so far (tests run in parallel:
    /// other tests' steps are under other directories).
    fn steps_under(root: &Path) -> Vec<String> {
        let root = root.display().to_string();
        let steps = DURABLE_STEPS.lock().unwrap();
        steps.iter().filter(|s| s.contains(&root)).map(|s| s.replace(&root, "ROOT")).collect()
    }

    #[test]
    fn the_write_order_makes_every_step_durable_before_the_next() {
        // A ledger in directories that do not exist yet: each is created
        // with its parent fsynced, before anything is written in it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hospital").join("privacy").join("ledger.json");
        let ledger = Ledger::open(&path).unwrap();
        assert_eq!(
            steps_under(dir.path()),
            [
                "create dir ROOT/hospital",
                "sync dir ROOT",
                "create dir ROOT/hospital/privacy",
                "sync dir ROOT/hospital",
                // Once more at every open: an earlier run may have made the
                // directory and crashed before syncing its entry.
                "sync dir ROOT/hospital",
            ]
        );
        // A reservation, then a round: each is its contents fsynced under a
        // temporary name, renamed over the ledger, the rename fsynced.
        let job = spec(3, true);
        let guard = ledger.reserve("j1", &job, "d", None).unwrap();
        guard.start_round().unwrap().durable().unwrap();
        let write = [
            "sync file ROOT/hospital/privacy/ledger.json.tmp",
            "rename ROOT/hospital/privacy/ledger.json.tmp -> ROOT/hospital/privacy/ledger.json",
            "sync dir ROOT/hospital/privacy",
        ];
        assert_eq!(steps_under(dir.path())[5..], [write, write].concat());
        let reread = Ledger::read(&path).unwrap();
        assert_eq!(reread.datasets["d"].jobs["j1"].rounds_started, 1);
        // Reopened (a new run): the directory's entry is synced again.
        drop((guard, ledger));
        let _ledger = Ledger::open(&path).unwrap();
        assert_eq!(steps_under(dir.path())[11..], ["sync dir ROOT/hospital"]);
    }

    /// The temporary file is the party's own: mode 0600, and a symlink left
    /// at its name is removed, not written through (found by review).
    #[test]
    fn the_ledgers_temporary_file_is_private_and_follows_no_link() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        std::os::unix::fs::symlink(&elsewhere, path.with_extension("json.tmp")).unwrap();
        let ledger = Ledger::open(&path).unwrap();
        ledger.reserve("j1", &spec(3, true), "d", None).unwrap().start_round().unwrap().durable().unwrap();
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(Ledger::read(&path).unwrap().datasets["d"].jobs["j1"].rounds_started, 1);
    }

    #[test]
    fn a_corrupt_ledger_is_an_error_naming_the_file_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        std::fs::write(&path, "{ not json").unwrap();
        let e = Ledger::open(&path).unwrap_err();
        assert!(e.contains("ledger.json") && e.contains("not a privacy ledger"), "{e}");
    }
}
