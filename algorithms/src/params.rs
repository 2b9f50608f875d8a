//! Model parameters as named tensors in a fixed order.

use std::collections::{BTreeMap, HashMap, HashSet};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::Error;

/// One named `f32` tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Unique name within the model, e.g. `linear.weight`.
    pub name: String,
    /// Dimensions; the product equals `data.len()`.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

/// A tensor's name and shape: what two parties must agree on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Tensor dimensions.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Number of values the tensor holds, or `None` on overflow.
    pub fn num_values(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

/// A model: tensors in a fixed order. The order is part of the model's
/// identity, so that flat vectors (for masking, encryption, transfer) line up
/// between parties.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parameters {
    tensors: Vec<Tensor>,
}

impl Parameters {
    /// Builds parameters, checking that names are unique and non-empty and that
    /// each shape matches its data length.
    pub fn new(tensors: Vec<Tensor>) -> Result<Self, Error> {
        let mut seen = HashSet::new();
        for t in &tensors {
            if t.name.is_empty() {
                return Err(Error::InvalidInput("tensor with an empty name".into()));
            }
            if !seen.insert(t.name.as_str()) {
                return Err(Error::InvalidInput(format!("tensor {} appears twice", t.name)));
            }
            let spec = TensorSpec { name: t.name.clone(), shape: t.shape.clone() };
            if spec.num_values() != Some(t.data.len()) {
                return Err(Error::InvalidInput(format!(
                    "tensor {}: shape {:?} does not hold {} values",
                    t.name,
                    t.shape,
                    t.data.len()
                )));
            }
        }
        Ok(Parameters { tensors })
    }

    /// Builds parameters from specs and the concatenated values, in order.
    pub fn from_flat(specs: &[TensorSpec], flat: &[f32]) -> Result<Self, Error> {
        let mut tensors = Vec::with_capacity(specs.len());
        let mut offset = 0usize;
        for s in specs {
            let n = s.num_values().ok_or_else(|| Error::InvalidInput(format!("tensor {}: shape overflows", s.name)))?;
            let end = offset
                .checked_add(n)
                .filter(|&e| e <= flat.len())
                .ok_or_else(|| Error::InvalidInput(format!("tensor {}: not enough values", s.name)))?;
            tensors.push(Tensor { name: s.name.clone(), shape: s.shape.clone(), data: flat[offset..end].to_vec() });
            offset = end;
        }
        if offset != flat.len() {
            return Err(Error::InvalidInput(format!("{} values given for tensors holding {offset}", flat.len())));
        }
        Parameters::new(tensors)
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// Mutable access to the tensors' values (names and shapes stay fixed).
    pub fn values_mut(&mut self) -> impl Iterator<Item = (&str, &mut [f32])> {
        self.tensors.iter_mut().map(|t| (t.name.as_str(), t.data.as_mut_slice()))
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Names and shapes, in order.
    pub fn spec(&self) -> Vec<TensorSpec> {
        self.tensors.iter().map(|t| TensorSpec { name: t.name.clone(), shape: t.shape.clone() }).collect()
    }

    /// Total number of values.
    pub fn num_values(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }

    /// All values, concatenated in order.
    pub fn flat_values(&self) -> impl Iterator<Item = f32> + '_ {
        self.tensors.iter().flat_map(|t| t.data.iter().copied())
    }

    /// Checks that there is no NaN or infinity; the error names the tensor and index.
    pub fn check_finite(&self) -> Result<(), String> {
        for t in &self.tensors {
            if let Some(i) = first_non_finite(&t.data) {
                return Err(format!("tensor {} holds {} at index {i}", t.name, t.data[i]));
            }
        }
        Ok(())
    }

    /// Checks that `self` has exactly the names and shapes of `expected`, in
    /// order, and only finite values. Used on every update before aggregation.
    pub fn check_matches(&self, expected: &[TensorSpec]) -> Result<(), String> {
        self.check_shapes(expected)?;
        self.check_finite()
    }

    /// Checks names and shapes against `expected`, in order (not the values),
    /// for callers that check finiteness in a pass of their own.
    pub fn check_shapes(&self, expected: &[TensorSpec]) -> Result<(), String> {
        if self.tensors.len() != expected.len() {
            return Err(format!("{} tensors where {} are expected", self.tensors.len(), expected.len()));
        }
        for (t, e) in self.tensors.iter().zip(expected) {
            if t.name != e.name {
                return Err(format!("tensor {} where {} is expected", t.name, e.name));
            }
            if t.shape != e.shape {
                return Err(format!("tensor {} has shape {:?}, expected {:?}", t.name, t.shape, e.shape));
            }
        }
        Ok(())
    }

    /// Serialises to safetensors; the tensor order is kept in the metadata
    /// under `confide.order` because safetensors itself sorts tensors.
    pub fn to_safetensors(&self, extra_metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, Error> {
        let bytes: Vec<Vec<u8>> =
            self.tensors.iter().map(|t| t.data.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
        let mut views = Vec::with_capacity(self.tensors.len());
        for (t, b) in self.tensors.iter().zip(&bytes) {
            let view = TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map_err(|e| Error::ModelFile(format!("tensor {}: {e}", t.name)))?;
            views.push((t.name.clone(), view));
        }
        let order: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        let mut meta: HashMap<String, String> = extra_metadata.clone().into_iter().collect();
        meta.insert("confide.order".into(), order.join("\n"));
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::ModelFile(e.to_string()))
    }

    /// Parses safetensors written by [`Parameters::to_safetensors`] (or any
    /// f32 safetensors file; without `confide.order` tensors come in name order).
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, Error> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::ModelFile(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::ModelFile(e.to_string()))?;
        let order = meta.metadata().as_ref().and_then(|m| m.get("confide.order")).cloned();
        let names: Vec<String> = match order {
            Some(order) if order.is_empty() => Vec::new(),
            Some(order) => order.split('\n').map(str::to_owned).collect(),
            None => {
                let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
                names.sort();
                names
            }
        };
        if names.len() != st.len() {
            return Err(Error::ModelFile("confide.order does not list every tensor".into()));
        }
        let mut tensors = Vec::with_capacity(names.len());
        for name in names {
            let view = st.tensor(&name).map_err(|e| Error::ModelFile(format!("tensor {name}: {e}")))?;
            if view.dtype() != Dtype::F32 {
                return Err(Error::ModelFile(format!(
                    "tensor {name}: dtype {:?}, only F32 is supported",
                    view.dtype()
                )));
            }
            let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            tensors.push(Tensor { name, shape: view.shape().to_vec(), data });
        }
        Parameters::new(tensors)
    }
}

/// The index of the first NaN or infinity. Runs on every update of every
/// round, so the common all-finite case is a branch-free (vectorised) scan
/// of fixed-size blocks; only a block that holds a bad value is searched.
fn first_non_finite(data: &[f32]) -> Option<usize> {
    const EXPONENT: u32 = 0x7f80_0000;
    const BLOCK: usize = 1024;
    data.chunks(BLOCK).enumerate().find_map(|(b, chunk)| {
        let bad = chunk.iter().fold(false, |acc, v| acc | (v.to_bits() & EXPONENT == EXPONENT));
        if bad { chunk.iter().position(|v| !v.is_finite()).map(|i| b * BLOCK + i) } else { None }
    })
}

/// ‖a − b‖² over the common length, in f64 (where no pair of finite f32
/// values overflows): the norm of an update, which DP clipping takes every
/// round over the whole model. Summed in eight lanes (fixed-size arrays the
/// compiler keeps in vector registers) and compiled for the CPU's widest
/// vector instructions (AVX2 or AVX-512, detected at run time by `pulp`).
pub fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    struct Distance<'a>(&'a [f32], &'a [f32]);
    impl pulp::WithSimd for Distance<'_> {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
            let Distance(a, b) = self;
            let n = a.len().min(b.len());
            let (a8, a_rest) = a[..n].as_chunks::<8>();
            let (b8, b_rest) = b[..n].as_chunks::<8>();
            let mut lanes = [0.0f64; 8];
            for (x, y) in a8.iter().zip(b8) {
                for k in 0..8 {
                    let d = f64::from(x[k]) - f64::from(y[k]);
                    lanes[k] += d * d;
                }
            }
            let rest: f64 = a_rest.iter().zip(b_rest).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
            lanes.iter().sum::<f64>() + rest
        }
    }
    pulp::Arch::new().dispatch(Distance(a, b))
}

/// `out[i] = scale·(a[i] − b[i])`, formed in f64 and rounded once to f32,
/// over `out`'s length (at most `a`'s and `b`'s); returns `Σ (a[i] − b[i])²`
/// over those values (unscaled, in f64 as [`squared_distance`]): a clipped
/// update's norm and its values in one pass over the two models.
/// Vectorised as [`squared_distance`] is.
pub fn scaled_difference_into(out: &mut [f32], a: &[f32], b: &[f32], scale: f64) -> f64 {
    struct Difference<'a>(&'a mut [f32], &'a [f32], &'a [f32], f64);
    impl pulp::WithSimd for Difference<'_> {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> f64 {
            let Difference(out, a, b, scale) = self;
            let n = out.len().min(a.len()).min(b.len());
            let (o8, o_rest) = out[..n].as_chunks_mut::<8>();
            let (a8, a_rest) = a[..n].as_chunks::<8>();
            let (b8, b_rest) = b[..n].as_chunks::<8>();
            let mut lanes = [0.0f64; 8];
            for ((o, x), y) in o8.iter_mut().zip(a8).zip(b8) {
                // Three loops, not one: written as one, the compiler
                // vectorised none of it (four times as slow).
                let mut d = [0.0f64; 8];
                for k in 0..8 {
                    d[k] = f64::from(x[k]) - f64::from(y[k]);
                }
                for k in 0..8 {
                    lanes[k] += d[k] * d[k];
                }
                for k in 0..8 {
                    o[k] = (scale * d[k]) as f32;
                }
            }
            let mut rest = 0.0;
            for ((o, &x), &y) in o_rest.iter_mut().zip(a_rest).zip(b_rest) {
                let d = f64::from(x) - f64::from(y);
                rest += d * d;
                *o = (scale * d) as f32;
            }
            lanes.iter().sum::<f64>() + rest
        }
    }
    pulp::Arch::new().dispatch(Difference(out, a, b, scale))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Parameters {
        Parameters::new(vec![
            Tensor { name: "w".into(), shape: vec![2, 3], data: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] },
            Tensor { name: "b".into(), shape: vec![2], data: vec![-1.0, 0.5] },
        ])
        .unwrap()
    }

    #[test]
    fn rejects_bad_shapes_and_duplicates() {
        assert!(Parameters::new(vec![Tensor { name: "w".into(), shape: vec![2, 2], data: vec![0.0; 3] }]).is_err());
        let t = Tensor { name: "w".into(), shape: vec![1], data: vec![0.0] };
        assert!(Parameters::new(vec![t.clone(), t]).is_err());
    }

    #[test]
    fn check_matches_names_the_problem() {
        let p = sample();
        assert!(p.check_matches(&p.spec()).is_ok());
        let mut spec = p.spec();
        spec[1].shape = vec![3];
        assert!(p.check_matches(&spec).unwrap_err().contains("tensor b"));
        let mut bad = p.clone();
        bad.values_mut().next().unwrap().1[4] = f32::NAN;
        assert!(bad.check_matches(&p.spec()).unwrap_err().contains("index 4"));
    }

    #[test]
    fn finds_the_first_non_finite_value_in_any_block() {
        let mut v = vec![1.5f32; 5000];
        assert_eq!(first_non_finite(&v), None);
        for (i, bad) in [(0, f32::NAN), (1023, f32::INFINITY), (1024, f32::NEG_INFINITY), (4999, f32::NAN)] {
            v[i] = bad;
            v[4000] = -f32::NAN;
            assert_eq!(first_non_finite(&v), Some(i.min(4000)), "at {i}");
            v[i] = f32::MAX;
            v[4000] = f32::MIN_POSITIVE;
        }
        assert_eq!(first_non_finite(&v), None, "extremes are finite");
        assert_eq!(first_non_finite(&[]), None);
    }

    #[test]
    fn safetensors_keeps_order() {
        let p = sample();
        let bytes = p.to_safetensors(&BTreeMap::new()).unwrap();
        assert_eq!(Parameters::from_safetensors(&bytes).unwrap(), p);
        assert!(Parameters::from_safetensors(&bytes[..bytes.len() - 3]).is_err());
    }

    proptest! {

        /// The vectorised distance is the plain loop's (to the lanes'
        /// summation order) and the written differences are exactly the
        /// plain ones, at lengths with and without a remainder past the
        /// last eight.
        #[test]
        fn differences_are_the_plain_ones(
            pairs in proptest::collection::vec((-1e3f32..1e3, -1e3f32..1e3), 0..70),
            scale in -4.0f64..4.0,
        ) {
            let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
            let plain: f64 = a.iter().zip(&b).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
            prop_assert!((squared_distance(&a, &b) - plain).abs() <= 1e-12 * plain.max(1.0));
            let mut out = vec![7.0; a.len()];
            let sum = scaled_difference_into(&mut out, &a, &b, scale);
            prop_assert!((sum - plain).abs() <= 1e-12 * plain.max(1.0));
            for ((o, &x), &y) in out.iter().zip(&a).zip(&b) {
                prop_assert_eq!(*o, (scale * (f64::from(x) - f64::from(y))) as f32);
            }
        }
        #[test]
        fn flat_round_trip(vals in proptest::collection::vec(-1e6f32..1e6, 1..64), split in 0usize..64) {
            let split = split % vals.len();
            let specs = vec![
                TensorSpec { name: "a".into(), shape: vec![split] },
                TensorSpec { name: "b".into(), shape: vec![vals.len() - split] },
            ];
            let p = Parameters::from_flat(&specs, &vals).unwrap();
            prop_assert_eq!(p.flat_values().collect::<Vec<_>>(), vals);
        }
    }
}
