//! [`State`]: what a strategy (and, with differential privacy, an
//! accountant) carries from one round to the next, saved with every
//! checkpoint so that a job resumed after a crash continues bit for bit.

use std::collections::BTreeMap;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::Error;

/// Named vectors of `f64`. Stored as little-endian F64 safetensors, so
/// values survive a save and load exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    entries: BTreeMap<String, Vec<f64>>,
}

impl State {
    /// An empty state.
    pub fn new() -> Self {
        State::default()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Stores `values` under `name` (replacing what was there).
    pub fn insert(&mut self, name: impl Into<String>, values: Vec<f64>) {
        self.entries.insert(name.into(), values);
    }

    /// The vector stored under `name`.
    pub fn get(&self, name: &str) -> Option<&[f64]> {
        self.entries.get(name).map(Vec::as_slice)
    }

    /// The stored names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The entries under `prefix` + ".", with the prefix removed: how a job
    /// keeps its parts' states (strategy, accountant) apart in one checkpoint.
    pub fn section(&self, prefix: &str) -> State {
        let p = format!("{prefix}.");
        let entries = self
            .entries
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&p).map(|rest| (rest.to_owned(), v.clone())))
            .collect();
        State { entries }
    }

    /// Adds `other`'s entries under `prefix` + ".".
    pub fn insert_section(&mut self, prefix: &str, other: State) {
        for (k, v) in other.entries {
            self.entries.insert(format!("{prefix}.{k}"), v);
        }
    }

    /// The safetensors bytes (F64 vectors).
    pub fn to_safetensors(&self) -> Result<Vec<u8>, Error> {
        let bytes: Vec<(String, Vec<u8>, usize)> = self
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), v.len()))
            .collect();
        let views: Vec<(String, TensorView<'_>)> = bytes
            .iter()
            .map(|(k, b, n)| {
                TensorView::new(Dtype::F64, vec![*n], b)
                    .map(|view| (k.clone(), view))
                    .map_err(|e| Error::ModelFile(format!("state {k}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        safetensors::serialize(views, None).map_err(|e| Error::ModelFile(format!("state: {e}")))
    }

    /// Reads what [`State::to_safetensors`] wrote; anything but 1-D F64 tensors is refused.
    pub fn from_safetensors(bytes: &[u8]) -> Result<State, Error> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::ModelFile(format!("state: {e}")))?;
        let mut entries = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F64 || view.shape().len() != 1 {
                return Err(Error::ModelFile(format!("state {name}: expected a 1-D F64 tensor")));
            }
            let values = view.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
            entries.insert(name, values.collect());
        }
        Ok(State { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exactly_and_keeps_sections_apart() {
        let mut strategy = State::new();
        strategy.insert("m", vec![0.1, -3.0e-300, f64::MIN_POSITIVE]);
        strategy.insert("v", vec![1.0 / 3.0]);
        let mut job = State::new();
        job.insert_section("strategy", strategy.clone());
        job.insert("other", vec![]);
        let back = State::from_safetensors(&job.to_safetensors().unwrap()).unwrap();
        assert_eq!(back, job);
        assert_eq!(back.section("strategy"), strategy);
        assert!(back.section("dp").is_empty());
        assert!(State::from_safetensors(b"not safetensors").is_err());
    }
}
