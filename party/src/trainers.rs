//! Building a job's [`Trainer`] from its spec and the party's data.

use confide_algorithms::data::DatasetSource;
use confide_algorithms::{LogisticRegression, ModelKind, Trainer};
use confide_proto::jobspec::JobSpec;

/// Makes the trainer for a job. The built-in factory covers the model kinds
/// of the job spec; a researcher can run a party with their own factory
/// (see `examples/`).
pub trait TrainerFactory: Send + Sync {
    /// A trainer for `spec` over `data`, at party `party`.
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String>;
}

/// The model kinds built into Confide.
#[derive(Debug, Default, Clone)]
pub struct BuiltinTrainers;

/// A stable 64-bit value from the party name (FNV-1a), so each party shuffles
/// differently but reproducibly.
pub fn party_salt(party: &str) -> u64 {
    party.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl TrainerFactory for BuiltinTrainers {
    fn build(&self, spec: &JobSpec, data: &DatasetSource, party: &str) -> Result<Box<dyn Trainer>, String> {
        let ds = data.load().map_err(|e| e.to_string())?;
        let (train, held_out) = ds.split(spec.training.validation_fraction, spec.training.seed);
        match spec.model.kind {
            ModelKind::LogisticRegression => {
                let m =
                    LogisticRegression::new(spec.model.classes, train, held_out, spec.training.seed, party_salt(party))
                        .map_err(|e| format!("{}: {e}", data.path.display()))?;
                Ok(Box::new(m))
            }
            #[allow(unreachable_patterns)]
            other => Err(format!("model kind {other:?} is not supported by this party")),
        }
    }
}
