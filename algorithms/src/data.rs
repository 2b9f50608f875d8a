//! Tabular data loaders. Rows are read at the party and never leave it.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::{Error, FeatureStats};

/// Features (row-major `f32`) and integer class labels.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    /// Row-major features, `rows × num_features`.
    pub features: Vec<f32>,
    /// One label per row.
    pub labels: Vec<u32>,
    /// Features per row.
    pub num_features: usize,
}

/// How a CSV file is laid out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvOptions {
    /// Skip the first line (a header, or the scikit-learn style `rows,cols,...` line).
    #[serde(default)]
    pub header: bool,
    /// Index of the label column; negative counts from the end (-1 = last).
    #[serde(default = "default_label_column")]
    pub label_column: i64,
}

fn default_label_column() -> i64 {
    -1
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions { header: false, label_column: -1 }
    }
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`'s features.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.num_features..(i + 1) * self.num_features]
    }

    /// Loads a CSV file (gzip when the name ends in `.gz`). Every malformed
    /// line is reported with its number.
    pub fn load_csv(path: &Path, opts: &CsvOptions) -> Result<Dataset, Error> {
        let text = Self::read_text(path)?;
        Self::parse_csv(&text, opts, path)
    }

    /// A text file's contents, gunzipped when the name ends in `.gz`.
    pub fn read_text(path: &Path) -> Result<String, Error> {
        let err = |line, reason: String| Error::Data { path: path.to_owned(), line, reason };
        let raw = std::fs::read(path).map_err(|e| err(0, e.to_string()))?;
        let text = if path.extension().is_some_and(|e| e == "gz") {
            let mut s = String::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .read_to_string(&mut s)
                .map_err(|e| err(0, format!("not valid gzip text: {e}")))?;
            s
        } else {
            String::from_utf8(raw).map_err(|_| err(0, "not UTF-8 text".into()))?
        };
        Ok(text)
    }

    fn parse_csv(text: &str, opts: &CsvOptions, path: &Path) -> Result<Dataset, Error> {
        let err = |line, reason: String| Error::Data { path: path.to_owned(), line, reason };
        let mut ds = Dataset::default();
        let mut width: Option<usize> = None;
        for (idx, line) in text.lines().enumerate() {
            let lineno = idx + 1;
            if (opts.header && idx == 0) || line.trim().is_empty() {
                continue;
            }
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            let w = *width.get_or_insert(cells.len());
            if cells.len() != w {
                return Err(err(lineno, format!("{} columns where earlier rows have {w}", cells.len())));
            }
            if w < 2 {
                return Err(err(lineno, "need at least one feature and a label".into()));
            }
            let label_idx = if opts.label_column < 0 {
                w.checked_sub(opts.label_column.unsigned_abs() as usize)
            } else {
                Some(opts.label_column as usize).filter(|&i| i < w)
            }
            .ok_or_else(|| err(lineno, format!("label_column {} is outside {w} columns", opts.label_column)))?;
            for (c, cell) in cells.iter().enumerate() {
                if c == label_idx {
                    let label: f64 =
                        cell.parse().map_err(|_| err(lineno, format!("label {cell:?} is not a number")))?;
                    if label < 0.0 || label.fract() != 0.0 || label > u32::MAX as f64 {
                        return Err(err(lineno, format!("label {cell:?} is not a class index")));
                    }
                    ds.labels.push(label as u32);
                } else {
                    let v: f32 = cell
                        .parse()
                        .map_err(|_| err(lineno, format!("column {} value {cell:?} is not a number", c + 1)))?;
                    if !v.is_finite() {
                        return Err(err(lineno, format!("column {} value {cell:?} is not finite", c + 1)));
                    }
                    ds.features.push(v);
                }
            }
            ds.num_features = w - 1;
        }
        if ds.is_empty() {
            return Err(err(0, "no data rows".into()));
        }
        Ok(ds)
    }

    /// Splits off a seeded random `fraction` of the rows as a held-out set:
    /// returns `(train, held_out)`.
    pub fn split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let held = ((self.len() as f64) * fraction).round() as usize;
        let held = held.min(self.len().saturating_sub(1));
        let (h, t) = idx.split_at(held);
        (self.select(t), self.select(h))
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut out = Dataset { num_features: self.num_features, ..Dataset::default() };
        for &i in indices {
            out.features.extend_from_slice(self.row(i));
            out.labels.push(self.labels[i]);
        }
        out
    }

    /// Per-feature sums over all rows.
    pub fn feature_stats(&self) -> FeatureStats {
        let d = self.num_features;
        let mut s = FeatureStats { count: self.len() as u64, sum: vec![0.0; d], sum_sq: vec![0.0; d] };
        for i in 0..self.len() {
            for (j, &v) in self.row(i).iter().enumerate() {
                s.sum[j] += v as f64;
                s.sum_sq[j] += (v as f64) * (v as f64);
            }
        }
        s
    }

    /// Writes the rows as CSV (features then label), e.g. to split a data set
    /// across demo parties.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        for i in 0..self.len() {
            for v in self.row(i) {
                out.push_str(&v.to_string());
                out.push(',');
            }
            out.push_str(&self.labels[i].to_string());
            out.push('\n');
        }
        out
    }
}

/// Where a data set lives and how to read it (a party's `[datasets.NAME]` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSource {
    /// The file.
    pub path: PathBuf,
    /// Its format.
    #[serde(default)]
    pub format: DataFormat,
    /// CSV layout.
    #[serde(flatten)]
    pub csv: CsvOptions,
}

/// Supported file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Comma-separated values, optionally gzip-compressed (`.gz`).
    #[default]
    Csv,
}

impl DatasetSource {
    /// A CSV file with the default layout (no header, label last).
    pub fn csv(path: PathBuf) -> Self {
        DatasetSource { path, format: DataFormat::Csv, csv: CsvOptions::default() }
    }

    /// Loads the data set.
    pub fn load(&self) -> Result<Dataset, Error> {
        match self.format {
            DataFormat::Csv => Dataset::load_csv(&self.path, &self.csv),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_header_label_and_reports_lines() {
        let p = Path::new("x.csv");
        let ds =
            Dataset::parse_csv("3,2,a,b\n1,2,0\n3,4,1\n", &CsvOptions { header: true, label_column: -1 }, p).unwrap();
        assert_eq!(ds.features, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(ds.labels, vec![0, 1]);
        let ds = Dataset::parse_csv("1,2,0\n", &CsvOptions { header: false, label_column: 0 }, p).unwrap();
        assert_eq!((ds.features.clone(), ds.labels.clone()), (vec![2.0, 0.0], vec![1]));
        let e = Dataset::parse_csv("1,2,0\n1,x,1\n", &CsvOptions::default(), p).unwrap_err();
        assert!(e.to_string().contains("x.csv:2"), "{e}");
        let e = Dataset::parse_csv("1,2,0\n1,1\n", &CsvOptions::default(), p).unwrap_err();
        assert!(e.to_string().contains(":2"), "{e}");
        assert!(Dataset::parse_csv("1,2,0.5\n", &CsvOptions::default(), p).is_err());
        assert!(Dataset::parse_csv("", &CsvOptions::default(), p).is_err());
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let ds = Dataset { features: (0..20).map(|v| v as f32).collect(), labels: vec![0; 20], num_features: 1 };
        let (t1, h1) = ds.split(0.25, 7);
        let (t2, h2) = ds.split(0.25, 7);
        assert_eq!((t1.clone(), h1.clone()), (t2, h2));
        assert_eq!((t1.len(), h1.len()), (15, 5));
        let mut all: Vec<f32> = t1.features.iter().chain(&h1.features).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, ds.features);
    }

    #[test]
    fn loads_the_real_breast_cancer_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/breast_cancer.csv");
        let ds = Dataset::load_csv(&path, &CsvOptions { header: true, label_column: -1 }).unwrap();
        assert_eq!((ds.len(), ds.num_features), (569, 30));
        assert_eq!(ds.labels.iter().filter(|&&l| l == 0).count(), 212);
    }
}
