//! The party's audit log: one JSON line per input that left the hospital
//! (joint inference forwards hard examples to a cloud party), written and
//! synced before the input is sent, so the log never misses one.
//!
//! A line records the time, the service, the SHA-256 of the input (not the
//! input), the destination party and the SHA-256 fingerprint of the
//! certificate whose key the input was encrypted to.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One forwarded input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedInput {
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The service the input was asked of.
    pub service: String,
    /// SHA-256 of the input row(s) as sent (little-endian f32), hex.
    pub input_sha256: String,
    /// Rows in the input.
    pub rows: usize,
    /// The cloud party it went to.
    pub destination: String,
    /// SHA-256 of that party's certificate (DER), hex.
    pub destination_certificate_sha256: String,
    /// The request's id on the stream.
    pub request_id: u64,
}

/// Where the file at `path` should end if its last line is half-written
/// (the length up to its last newline), or `None` when it ends in one (or
/// is empty): read backwards from the end, a block at a time.
pub(crate) fn torn_tail(path: &Path) -> std::io::Result<Option<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 << 10;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; BLOCK as usize];
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if end == len && buf[n - 1] == b'\n' {
            return Ok(None);
        }
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64 + 1));
        }
        end = start;
    }
    Ok((len > 0).then_some(0))
}

/// An append-only JSON-lines file.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (creating, mode 0600 on Unix) the log at `path` for appending.
    pub fn open(path: &Path) -> Result<AuditLog, String> {
        Self::open_noting(path, &mut |_| {})
    }

    /// [`AuditLog::open`], telling `note` its durable steps (for tests).
    fn open_noting(path: &Path, note: &mut dyn FnMut(String)) -> Result<AuditLog, String> {
        let mut opts = std::fs::OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(path).map_err(|e| format!("audit log {}: {e}", path.display()))?;
        // The log's own directory entry made durable before any input goes
        // out: a power loss after the first forward must not take a new
        // log (records are synced with `sync_data`, which does not cover
        // the entry). Once per start, whether or not it was just created.
        confide_proto::durable::sync_parent(path, note)
            .map_err(|e| format!("audit log {}: its directory: {e}", path.display()))?;
        // A line a crash (or a full disk) left half-written is the record
        // of an input that was never forwarded (an input goes out only once
        // its record is on disk): cut it, or the next record would be glued
        // to it and fail to parse (found by review).
        // Only the log's tail is read (it grows for as long as the party
        // serves).
        if let Some(whole) = torn_tail(path).map_err(|e| format!("audit log {}: {e}", path.display()))? {
            tracing::warn!(log = %path.display(), "cutting a half-written last record (its input was not forwarded)");
            file.set_len(whole)
                .and_then(|()| file.sync_data())
                .map_err(|e| format!("audit log {}: {e}", path.display()))?;
        }
        Ok(AuditLog { path: path.to_owned(), file: Mutex::new(file) })
    }

    /// Appends one record and syncs it to disk; a write that fails is cut
    /// back off, so that no half-written line is left for the next.
    pub fn record(&self, entry: &ForwardedInput) -> Result<(), String> {
        let mut line = serde_json::to_vec(entry).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let before = f.metadata().map(|m| m.len());
        f.write_all(&line).and_then(|_| f.sync_data()).map_err(|e| {
            if let Ok(len) = before {
                let _ = f.set_len(len);
            }
            format!("audit log {}: {e}", self.path.display())
        })
    }

    /// Every record in the log at `path`; a line that does not parse is an
    /// error naming its number.
    pub fn read(path: &Path) -> Result<Vec<ForwardedInput>, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("audit log {}: {e}", path.display())),
        };
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("audit log {}:{}: {e}", path.display(), i + 1)))
            .collect()
    }
}

/// Unix milliseconds now.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// SHA-256 of rows as sent: their little-endian `f32` bytes.
pub fn rows_sha256(rows: &[f32]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for v in rows {
        h.update(v.to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_logs_directory_entry_is_synced_before_the_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.audit.jsonl");
        let mut steps = Vec::new();
        let _log = AuditLog::open_noting(&path, &mut |s| steps.push(s)).unwrap();
        assert_eq!(steps, vec![format!("sync dir {}", dir.path().display())]);
    }

    #[test]
    fn records_are_appended_durably_and_read_back_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.audit.jsonl");
        let entry = |id| ForwardedInput {
            time_ms: 1,
            service: "digits".into(),
            input_sha256: rows_sha256(&[1.0, 2.0]),
            rows: 1,
            destination: "cloud-0".into(),
            destination_certificate_sha256: "ab".repeat(32),
            request_id: id,
        };
        AuditLog::open(&path).unwrap().record(&entry(1)).unwrap();
        let log = AuditLog::open(&path).unwrap();
        log.record(&entry(2)).unwrap();
        let back = AuditLog::read(&path).unwrap();
        assert_eq!(back, vec![entry(1), entry(2)]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // The hash is of the values, not a rendering of them.
        assert_ne!(rows_sha256(&[1.0, 2.0]), rows_sha256(&[2.0, 1.0]));
        assert_eq!(rows_sha256(&[]), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        // A half-written last line (a crash mid-append) is cut at the next
        // open, and the next record parses.
        let whole = std::fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(b"{\"time_ms\":3,\"serv");
        std::fs::write(&path, &torn).unwrap();
        AuditLog::open(&path).unwrap().record(&entry(3)).unwrap();
        assert_eq!(AuditLog::read(&path).unwrap(), vec![entry(1), entry(2), entry(3)]);
        // The tail is found backwards across blocks, and a file of one torn
        // line is cut whole.
        let long = dir.path().join("long.jsonl");
        let mut text = "x".repeat(200_000);
        text.push('\n');
        text.push_str(&"y".repeat(150_000));
        std::fs::write(&long, &text).unwrap();
        assert_eq!(torn_tail(&long).unwrap(), Some(200_001));
        std::fs::write(&long, "z".repeat(70_000)).unwrap();
        assert_eq!(torn_tail(&long).unwrap(), Some(0));
        std::fs::write(&long, "a\n").unwrap();
        assert_eq!(torn_tail(&long).unwrap(), None);
        std::fs::write(&path, "{not json}\n").unwrap();
        assert!(AuditLog::read(&path).unwrap_err().contains(":1:"));
    }
}
