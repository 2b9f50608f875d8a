//! Wire types of the Confide federation.
//!
//! * [`pb`]: the gRPC services and messages generated from `proto/confide.proto`.
//! * [`messages`]: the [`Stage`] type and the typed tasks and results both
//!   sides handle, with their conversions from and to [`pb`].
//! * [`transfer`]: chunked transfer of bulk vectors with size checks before buffering.
//! * [`jobspec`]: the TOML job spec and its validation (every error with its
//!   field path and file name).
//! * [`status`]: the JSON job status shown by `confide job status --json`.
//! * [`telemetry`]: Prometheus metrics served at `/metrics`.
//! * [`durable`]: directories made durable for crash-safe files.
//! * [`Limits`]: every size the federation enforces at its boundaries.

pub mod deploy;
pub mod dpspec;
pub mod durable;
pub mod http;
pub mod jobspec;
pub mod messages;
pub mod net;
pub mod pipeline;
pub mod status;
pub mod telemetry;
pub mod transfer;

pub use messages::{Stage, StageName};

mod error;
pub use error::Error;

/// Generated protobuf and gRPC code (package `confide.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("confide.v1");
}

/// Software version announced in `Hello`/`Welcome`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The largest advertised policy a hello carries (JSON bytes): a party
/// sends none larger, the coordinator keeps none larger.
pub const MAX_ADVERTISED_POLICY: usize = 16 * 1024;

/// The most services one serving report lists, on both sides.
pub const MAX_SERVING_SERVICES: usize = 256;

/// The longest job id a party accepts.
pub const MAX_JOB_ID_LEN: usize = 64;

/// Checks a job id from the wire: 1 to [`MAX_JOB_ID_LEN`] ASCII letters,
/// digits, '-', '_' or '.'. A party keys its privacy ledger, its worker
/// thread and its logs by the id, so an empty one, a control character or
/// an unbounded one is refused before anything is reserved.
pub fn validate_job_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_JOB_ID_LEN
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        let shown: String = id.chars().take(MAX_JOB_ID_LEN).collect();
        return Err(format!(
            "job_id {shown:?}{} is not a job id (1 to {MAX_JOB_ID_LEN} ASCII letters, digits, '-', '_', '.')",
            if id.chars().count() > MAX_JOB_ID_LEN { "…" } else { "" }
        ));
    }
    Ok(())
}

/// Sizes enforced at the federation's boundaries. Both ends check them before
/// buffering, so an oversized or lying peer costs at most one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest encoded gRPC message accepted (tonic's decoding limit).
    pub max_message_bytes: usize,
    /// Size of the chunks large tensors are split into.
    pub chunk_bytes: usize,
    /// Most parameter values in one model or update.
    pub max_values: usize,
    /// Most tensors in one model.
    pub max_tensors: usize,
    /// Most parties in one job.
    pub max_parties: usize,
    /// Largest job spec accepted.
    pub max_spec_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 << 20,
            chunk_bytes: 256 << 10,
            max_values: 64 << 20,
            max_tensors: 4096,
            max_parties: 1000,
            max_spec_bytes: 64 << 10,
        }
    }
}

impl Limits {
    /// Checks that the limits are coherent (a chunk plus framing fits in a message).
    pub fn validate(&self) -> Result<(), Error> {
        // Ceilings too, so that the arithmetic on the limits (a dimension's
        // limit plus one, values times four, a chunk plus its framing)
        // cannot overflow, and a configuration cannot promise buffers no
        // machine could allocate.
        for (field, value, ceiling) in [
            ("limits.max_message_bytes", self.max_message_bytes, 1usize << 30),
            ("limits.max_values", self.max_values, 1 << 30),
            ("limits.max_tensors", self.max_tensors, 1 << 20),
            ("limits.max_parties", self.max_parties, 1 << 20),
            ("limits.max_spec_bytes", self.max_spec_bytes, 64 << 20),
        ] {
            if value > ceiling {
                return Err(Error::InvalidInput(format!("{field} ({value}) is above its ceiling of {ceiling}")));
            }
        }
        if self.chunk_bytes == 0
            || !self.chunk_bytes.is_multiple_of(4)
            || self.chunk_bytes.saturating_add(1024) > self.max_message_bytes
        {
            return Err(Error::InvalidInput(format!(
                "limits.chunk_bytes ({}) must be a positive multiple of 4 and at least 1 KiB below limits.max_message_bytes ({})",
                self.chunk_bytes, self.max_message_bytes
            )));
        }
        if self.max_values == 0 || self.max_tensors == 0 || self.max_parties == 0 || self.max_spec_bytes == 0 {
            return Err(Error::InvalidInput("limits: every limit must be positive".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod job_id_tests {
    use super::*;

    /// Every limit has a ceiling, named when passed (found by review: a
    /// `max_values` of `usize::MAX` made `max_values + 1` wrap).
    #[test]
    fn limits_above_their_ceilings_are_refused_naming_the_field() {
        assert_eq!(Limits::default().validate().map_err(|e| e.to_string()), Ok(()));
        type Case = (&'static str, fn(&mut Limits));
        let cases: [Case; 6] = [
            ("limits.max_values", |l| l.max_values = usize::MAX),
            ("limits.max_message_bytes", |l| l.max_message_bytes = usize::MAX),
            ("limits.max_tensors", |l| l.max_tensors = 1 << 21),
            ("limits.max_parties", |l| l.max_parties = 1 << 21),
            ("limits.max_spec_bytes", |l| l.max_spec_bytes = 65 << 20),
            ("limits.chunk_bytes", |l| l.chunk_bytes = usize::MAX - 3),
        ];
        for (field, set) in cases {
            let mut limits = Limits::default();
            set(&mut limits);
            let e = limits.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn a_job_id_is_a_short_printable_name() {
        for ok in ["j18f3a-00ff", "job-1", "a", "x.y_z", &"j".repeat(MAX_JOB_ID_LEN)] {
            assert_eq!(validate_job_id(ok), Ok(()), "{ok:?}");
        }
        for bad in ["", "j\0", "j k", "j\n", "../j", "j/k", "é", &"j".repeat(MAX_JOB_ID_LEN + 1)] {
            let e = validate_job_id(bad).unwrap_err();
            assert!(e.starts_with("job_id "), "{e}");
        }
    }
}
