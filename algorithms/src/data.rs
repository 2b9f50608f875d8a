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

    /// Appends `other`'s rows (of the same width).
    pub fn append(&mut self, other: &Dataset) {
        self.num_features = other.num_features;
        self.features.extend_from_slice(&other.features);
        self.labels.extend_from_slice(&other.labels);
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
///
/// `path` is a file, or a directory of CSV batches (`*.csv`, `*.csv.gz`,
/// read in name order): a *watched* data set, which incremental pipelines
/// retrain on as batches arrive. Each batch of a directory is split into
/// training and held-out rows on its own, so a row stays on its side of
/// the split as batches are added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSource {
    /// The file or directory.
    pub path: PathBuf,
    /// Its format.
    #[serde(default)]
    pub format: DataFormat,
    /// CSV layout.
    #[serde(flatten)]
    pub csv: CsvOptions,
    /// For one job, only these batches of a directory (set by the party).
    #[serde(skip)]
    pub only: Option<Vec<PathBuf>>,
    /// For one job, every selected row is held out (set by the party to
    /// score versions on new batches).
    #[serde(skip)]
    pub all_held_out: bool,
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
        DatasetSource { path, format: DataFormat::Csv, csv: CsvOptions::default(), only: None, all_held_out: false }
    }

    /// Whether `path` is a directory of batches.
    pub fn is_watched(&self) -> bool {
        self.path.is_dir()
    }

    /// The batches of a watched data set, in name order.
    pub fn batches(&self) -> Result<Vec<PathBuf>, Error> {
        let rd =
            std::fs::read_dir(&self.path).map_err(|e| Error::InvalidInput(format!("{}: {e}", self.path.display())))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::InvalidInput(format!("{}: {e}", self.path.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A batch being written is `*.tmp` or hidden until it is renamed.
            if !name.starts_with('.') && (name.ends_with(".csv") || name.ends_with(".csv.gz")) {
                out.push(entry.path());
            }
        }
        out.sort();
        Ok(out)
    }

    fn files(&self) -> Result<Vec<PathBuf>, Error> {
        if !self.is_watched() {
            return Ok(vec![self.path.clone()]);
        }
        let files = match &self.only {
            Some(only) => only.clone(),
            None => self.batches()?,
        };
        if files.is_empty() && self.only.is_none() {
            return Err(Error::InvalidInput(format!("{}: no CSV batches in the directory", self.path.display())));
        }
        Ok(files)
    }

    /// Loads the data set (every batch of a directory).
    pub fn load(&self) -> Result<Dataset, Error> {
        let DataFormat::Csv = self.format;
        if !self.is_watched() {
            return Dataset::load_csv(&self.path, &self.csv);
        }
        let mut all = Dataset::default();
        self.each_batch(|_, ds| all.append(ds))?;
        Ok(all)
    }

    /// Reads each selected batch, checking that all have one width.
    fn each_batch(&self, mut f: impl FnMut(&str, &Dataset)) -> Result<usize, Error> {
        let mut width = None;
        for file in self.files()? {
            let ds = Dataset::load_csv(&file, &self.csv)?;
            match width {
                None => width = Some(ds.num_features),
                Some(w) if w != ds.num_features => {
                    return Err(Error::InvalidInput(format!(
                        "{}: {} features; the directory's other batches have {w}",
                        file.display(),
                        ds.num_features
                    )));
                }
                Some(_) => {}
            }
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            f(&name, &ds);
        }
        Ok(width.unwrap_or(0))
    }

    /// Loads the data set and splits off a seeded `fraction` as held-out
    /// rows: `(train, held_out)`. A directory's batches are split one by one
    /// (seeded by the batch's name), so each row's side never changes.
    pub fn load_split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset), Error> {
        let DataFormat::Csv = self.format;
        if !self.is_watched() {
            let ds = Dataset::load_csv(&self.path, &self.csv)?;
            return Ok(if self.all_held_out { (ds.clone(), ds) } else { ds.split(fraction, seed) });
        }
        let mut train = Dataset::default();
        let mut held = Dataset::default();
        let width = self.each_batch(|name, ds| {
            let (t, h) =
                if self.all_held_out { (ds.clone(), ds.clone()) } else { ds.split(fraction, seed ^ fnv1a(name)) };
            train.append(&t);
            held.append(&h);
        })?;
        train.num_features = width;
        held.num_features = width;
        Ok((train, held))
    }
}

/// FNV-1a of a batch's name: a stable per-batch split seed.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
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
    fn a_directory_is_its_batches_each_split_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let rows = |from: usize| (from..from + 20).map(|v| format!("{v},{}\n", v % 2)).collect::<String>();
        std::fs::write(dir.path().join("001.csv"), rows(0)).unwrap();
        let src = DatasetSource::csv(dir.path().to_owned());
        assert!(src.is_watched());
        let (_, held1) = src.load_split(0.25, 3).unwrap();
        // A second batch does not move the first batch's held-out rows.
        std::fs::write(dir.path().join("002.csv"), rows(100)).unwrap();
        std::fs::write(dir.path().join(".003.csv"), "not yet").unwrap();
        let (train2, held2) = src.load_split(0.25, 3).unwrap();
        assert_eq!(&held2.features[..held1.features.len()], &held1.features[..]);
        assert_eq!(train2.len() + held2.len(), 40);
        assert_eq!(src.load().unwrap().len(), 40);
        // A batch of another width is named.
        std::fs::write(dir.path().join("004.csv"), "1,2,0\n").unwrap();
        let e = src.load().unwrap_err().to_string();
        assert!(e.contains("004.csv") && e.contains("other batches"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = DatasetSource::csv(empty.path().to_owned()).load().unwrap_err().to_string();
        assert!(e.contains("no CSV batches"), "{e}");
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
