//! Tabular data loaders. Rows are read at the party and never leave it.

use std::io::Read;
use std::path::{Path, PathBuf};

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

impl CsvOptions {
    /// Where the label is in a row of `width` columns, if it fits.
    pub fn label_index(&self, width: usize) -> Option<usize> {
        if self.label_column < 0 {
            width.checked_sub(self.label_column.unsigned_abs() as usize)
        } else {
            usize::try_from(self.label_column).ok().filter(|&i| i < width)
        }
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

    /// Loads a CSV file (gzip when it starts with gzip's magic bytes or the
    /// name ends in `.gz`). Every malformed line is reported with its number.
    pub fn load_csv(path: &Path, opts: &CsvOptions) -> Result<Dataset, Error> {
        let text = Self::read_text(path)?;
        Self::parse_csv(&text, opts, path)
    }

    /// A text file's contents, gunzipped when it is gzip, of at most
    /// [`DEFAULT_MAX_DATA_BYTES`].
    pub fn read_text(path: &Path) -> Result<String, Error> {
        Self::read_text_with(path, false, DEFAULT_MAX_DATA_BYTES, false)
    }

    /// [`Dataset::read_text`]; `lossy`: bytes that are not UTF-8 become
    /// U+FFFD (their rows then fail their own checks) instead of failing
    /// the file; `max_bytes`: the most the file (and, gzip, its text) may
    /// hold, so that a runaway export or a gzip bomb is refused naming the
    /// file rather than ending the party out of memory (found by review);
    /// `regular_only`: a data set's files must be regular files (a FIFO or
    /// a device would block the read, or never end it), where a command's
    /// input may be a pipe.
    fn read_text_with(path: &Path, lossy: bool, max_bytes: u64, regular_only: bool) -> Result<String, Error> {
        let err = |line, reason: String| Error::Data { path: path.to_owned(), line, reason };
        let too_big = || {
            err(0, format!("more than {max_bytes} bytes (datasets.NAME.max_bytes, default {DEFAULT_MAX_DATA_BYTES})"))
        };
        let meta = std::fs::metadata(path).map_err(|e| err(0, e.to_string()))?;
        if regular_only && !meta.is_file() {
            return Err(err(0, "not a regular file".into()));
        }
        if meta.len() > max_bytes {
            return Err(too_big());
        }
        let mut raw = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(max_bytes.saturating_add(1)).read_to_end(&mut raw))
            .map_err(|e| err(0, e.to_string()))?;
        if raw.len() as u64 > max_bytes {
            return Err(too_big());
        }
        // Gzip by its magic bytes too (no CSV starts with 0x1f): a
        // compressed file named `.csv` or `.GZ` would otherwise be read as
        // text, and under DP every line dropped as malformed (found by
        // review).
        let gzip = raw.starts_with(&[0x1f, 0x8b]) || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"));
        let bytes = if gzip {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice())
                .take(max_bytes.saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|e| err(0, format!("not valid gzip: {e}")))?;
            if out.len() as u64 > max_bytes {
                return Err(too_big());
            }
            out
        } else {
            raw
        };
        match String::from_utf8(bytes) {
            Ok(text) => Ok(text),
            Err(e) if lossy => Ok(String::from_utf8_lossy(e.as_bytes()).into_owned()),
            Err(_) => Err(err(0, "not UTF-8 text".into())),
        }
    }

    fn parse_csv(text: &str, opts: &CsvOptions, path: &Path) -> Result<Dataset, Error> {
        let (ds, _) = Self::parse_csv_with(text, opts, path, None, None)?;
        if ds.is_empty() {
            return Err(Error::Data { path: path.to_owned(), line: 0, reason: "no data rows".into() });
        }
        Ok(ds)
    }

    /// [`Dataset::parse_csv`] (but empty files pass); under `rules`, a row
    /// that fails a check of its own (its width, a cell that is not a
    /// finite number, a label that is not one of the classes) is dropped
    /// instead of failing the file, and counted. Without rules, a label
    /// outside `classes` (when given) fails the file at its line.
    fn parse_csv_with(
        text: &str,
        opts: &CsvOptions,
        path: &Path,
        rules: Option<&RowRules>,
        classes: Option<usize>,
    ) -> Result<(Dataset, usize), Error> {
        let err = |line, reason: String| Error::Data { path: path.to_owned(), line, reason };
        let mut ds = Dataset::default();
        let layout = |line, w: usize| {
            if w < 2 {
                return Err(err(line, "need at least one feature and a label".into()));
            }
            opts.label_index(w)
                .ok_or_else(|| err(line, format!("label_column {} is outside {w} columns", opts.label_column)))
        };
        // Under the rules the width is fixed before any row is read, and so
        // is whether the layout fits it: no row decides either.
        let mut width: Option<usize> = None;
        if let Some(r) = rules {
            layout(0, r.features + 1)?;
            width = Some(r.features + 1);
            ds.num_features = r.features;
        }
        let mut dropped = 0;
        let mut row = Vec::new();
        for (idx, line) in text.lines().enumerate() {
            let lineno = idx + 1;
            if (opts.header && idx == 0) || line.trim().is_empty() {
                continue;
            }
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            let w = *width.get_or_insert(cells.len());
            let label_idx = layout(lineno, w)?;
            match parse_row(&cells, w, label_idx, &mut row) {
                Ok(label) if rules.is_some_and(|r| label as usize >= r.classes) => dropped += 1,
                Ok(label) if rules.is_none() && classes.is_some_and(|c| label as usize >= c) => {
                    let c = classes.unwrap_or_default();
                    return Err(err(lineno, format!("label {label} is outside the model's {c} classes")));
                }
                Ok(label) => {
                    ds.features.extend_from_slice(&row);
                    ds.labels.push(label);
                }
                Err(_) if rules.is_some() => dropped += 1,
                Err(reason) => return Err(err(lineno, reason)),
            }
            ds.num_features = w - 1;
        }
        Ok((ds, dropped))
    }

    /// Splits off about `fraction` of the rows as a held-out set, each row's
    /// side decided by its own values and `seed` alone (a keyed hash):
    /// returns `(train, held_out)`, each in the rows' order.
    ///
    /// Not a shuffle of positions: there, adding or removing one row moves
    /// every later row's position and so, under the same seed, swaps many
    /// rows between the sides, and example-level DP (whose neighbouring
    /// data sets differ by one row) would not hold for the training set,
    /// nor would a DP evaluation's sensitivity for the held-out one. Here a
    /// row's side never depends on another row: data sets that differ by
    /// one row give training sets, and held-out sets, that differ by at
    /// most that row, whatever the seed. Equal rows fall on one side.
    pub fn split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let (mut held, mut train) = (Vec::new(), Vec::new());
        for i in 0..self.len() {
            if self.is_held_out(i, fraction, seed) {
                held.push(i);
            } else {
                train.push(i);
            }
        }
        (self.select(&train), self.select(&held))
    }

    /// Exactly round(n·`fraction`) rows (at least one row left) held out by
    /// a seeded shuffle of positions: `(rest, held_out)`. For preparing
    /// data sets (`confide data split` writes its test file so); not for a
    /// party's held-out rows, which [`Dataset::split`] chooses, since here
    /// one row added or removed moves others between the sides.
    pub fn shuffle_split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        use rand::SeedableRng as _;
        use rand::seq::SliceRandom as _;
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let held = ((self.len() as f64) * fraction).round() as usize;
        let held = held.min(self.len().saturating_sub(1));
        let (h, t) = idx.split_at(held);
        (self.select(t), self.select(h))
    }

    /// Whether row `i` is held out: a BLAKE3 hash of the seed, its values
    /// and its label, as a uniform 64-bit number, is below `fraction`·2^64.
    fn is_held_out(&self, i: usize, fraction: f64, seed: u64) -> bool {
        // 0 (or NaN, which the spec refuses) holds nothing out.
        if fraction.is_nan() || fraction <= 0.0 {
            return false;
        }
        let mut h = blake3::Hasher::new_derive_key("confide held-out split v1");
        h.update(&seed.to_le_bytes());
        for v in self.row(i) {
            h.update(&v.to_le_bytes());
        }
        h.update(&self.labels[i].to_le_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&h.finalize().as_bytes()[..8]);
        // fraction < 1 (the spec's bound is 0.9): the product is below 2^64.
        (u64::from_le_bytes(first) as f64) < fraction.min(1.0) * 2f64.powi(64)
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

/// One data line's `cells` (`width` of them, the label at `label_idx`):
/// its features into `row`, and its label; or why it is not a row.
fn parse_row(cells: &[&str], width: usize, label_idx: usize, row: &mut Vec<f32>) -> Result<u32, String> {
    if cells.len() != width {
        return Err(format!("{} columns where earlier rows have {width}", cells.len()));
    }
    row.clear();
    let mut label = 0;
    for (c, cell) in cells.iter().enumerate() {
        if c == label_idx {
            let l: f64 = cell.parse().map_err(|_| format!("label {cell:?} is not a number"))?;
            if l < 0.0 || l.fract() != 0.0 || l > u32::MAX as f64 {
                return Err(format!("label {cell:?} is not a class index"));
            }
            label = l as u32;
        } else {
            let v: f32 = cell.parse().map_err(|_| format!("column {} value {cell:?} is not a number", c + 1))?;
            if !v.is_finite() {
                return Err(format!("column {} value {cell:?} is not finite", c + 1));
            }
            row.push(v);
        }
    }
    Ok(label)
}

/// How a DP job reads its rows (set by the party): a row that fails a
/// check of its own is dropped, not a reason to refuse the job, since
/// whether a job is refused must not depend on one patient's row (a
/// coordinator could otherwise ask, through `model.classes`, whether any
/// row has a label above k). Dropping a row is a function of that row
/// alone, so data sets that differ by one row still differ by at most one.
/// No valid row at all is an empty data set, not a refusal either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRules {
    /// Features per row, fixed before any row is read (the spec's
    /// `dp.feature_ranges` or the data set's `features`): a width taken
    /// from the rows, say the first well-formed row's, would let one row of
    /// another width placed first change which rows are taken.
    pub features: usize,
    /// Labels must be below this (`model.classes`).
    pub classes: usize,
}

/// Whether a file directly in a watched directory is one of its batches:
/// a `.csv` or `.csv.gz` file in any case (`.CSV` from a spreadsheet
/// export was silently never read: found by review), not hidden (a batch
/// being written is `*.tmp` or hidden until it is renamed).
pub fn is_batch_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.starts_with('.') && (lower.ends_with(".csv") || lower.ends_with(".csv.gz"))
}

/// Where a data set lives and how to read it (a party's `[datasets.NAME]` table).
///
/// `path` is a file, or a directory of CSV batches (`*.csv`, `*.csv.gz`,
/// read in name order): a *watched* data set, which incremental pipelines
/// retrain on as batches arrive. Each row's side of the held-out split is
/// its own ([`Dataset::split`]), so it stays there as batches are added.
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
    /// Features per row, when the data set declares its width: a DP job
    /// then takes only rows of this width ([`RowRules`]), whatever the
    /// first row looks like.
    #[serde(default)]
    pub features: Option<usize>,
    /// For one DP job, rows that fail a check of their own are dropped
    /// ([`RowRules`]; set by the party).
    #[serde(skip)]
    pub drop_invalid_rows: Option<RowRules>,
    /// For one job without DP, the model's classes: a label outside them
    /// fails the file naming its line (set by the party), where the
    /// trainer could only say that some row's label was out of range.
    #[serde(skip)]
    pub label_classes: Option<usize>,
    /// The most bytes one file (or a gzip file's text) may hold
    /// (default [`DEFAULT_MAX_DATA_BYTES`]): what a file reads is held in
    /// memory whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// The most bytes a data file (or a gzip file's text) may hold unless its
/// data set says otherwise (`max_bytes`): 4 GiB.
pub const DEFAULT_MAX_DATA_BYTES: u64 = 4 << 30;

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
        DatasetSource {
            path,
            format: DataFormat::Csv,
            csv: CsvOptions::default(),
            only: None,
            all_held_out: false,
            features: None,
            drop_invalid_rows: None,
            label_classes: None,
            max_bytes: None,
        }
    }

    /// The most bytes one of its files may hold.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes.unwrap_or(DEFAULT_MAX_DATA_BYTES)
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
            // Regular files only (a link is followed): a FIFO named like a
            // batch would block the read.
            if is_batch_name(&entry.file_name().to_string_lossy())
                && std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file())
            {
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
        // Under a DP job's rules a directory with no batch is no rows, as
        // one with a single empty batch is: whether a job sets up must not
        // depend on whether one row (in a batch of its own) is there.
        if files.is_empty() && self.only.is_none() && self.drop_invalid_rows.is_none() {
            return Err(Error::InvalidInput(format!("{}: no CSV batches in the directory", self.path.display())));
        }
        Ok(files)
    }

    /// Loads the data set (every batch of a directory).
    pub fn load(&self) -> Result<Dataset, Error> {
        let mut all = Dataset::default();
        let width = self.each_batch(|ds| all.append(ds))?;
        all.num_features = width;
        Ok(all)
    }

    /// Reads each selected batch (the file itself when it is not a
    /// directory), checking that all have one width. Under
    /// [`DatasetSource::drop_invalid_rows`] the width is the one fixed in
    /// advance, rows of another are dropped, and a batch or data set with
    /// no valid row is empty (whether a DP job sets up must not depend on
    /// whether one row is there); otherwise a batch with no rows is an
    /// error. Returns the width and the rows dropped.
    fn each_batch_counted(&self, mut f: impl FnMut(&Dataset)) -> Result<(usize, usize), Error> {
        let DataFormat::Csv = self.format;
        let rules = self.drop_invalid_rows;
        let mut width = rules.map(|r| r.features);
        let mut dropped = 0;
        for file in self.files()? {
            let text = Dataset::read_text_with(&file, rules.is_some(), self.max_bytes(), true)?;
            let (ds, d) = Dataset::parse_csv_with(&text, &self.csv, &file, rules.as_ref(), self.label_classes)?;
            dropped += d;
            if ds.is_empty() {
                if rules.is_none() {
                    return Err(Error::Data { path: file, line: 0, reason: "no data rows".into() });
                }
                continue;
            }
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
            f(&ds);
        }
        Ok((width.unwrap_or(0), dropped))
    }

    fn each_batch(&self, f: impl FnMut(&Dataset)) -> Result<usize, Error> {
        self.each_batch_counted(f).map(|(width, _)| width)
    }

    /// Loads the data set and splits off about `fraction` of it as held-out
    /// rows ([`Dataset::split`]): `(train, held_out)`. Each row's side
    /// depends on the row alone, so it never changes as a directory's
    /// batches arrive.
    pub fn load_split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset), Error> {
        self.load_split_counted(fraction, seed).map(|(train, held, _)| (train, held))
    }

    /// [`DatasetSource::load_split`], with the rows dropped under
    /// [`DatasetSource::drop_invalid_rows`].
    pub fn load_split_counted(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset, usize), Error> {
        let mut train = Dataset::default();
        let mut held = Dataset::default();
        let (width, dropped) = self.each_batch_counted(|ds| {
            let (t, h) = if self.all_held_out { (ds.clone(), ds.clone()) } else { ds.split(fraction, seed) };
            train.append(&t);
            held.append(&h);
        })?;
        train.num_features = width;
        held.num_features = width;
        Ok((train, held, dropped))
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

    /// Without DP the party gives the model's classes: a label outside them
    /// fails the file at its line (the trainer could say only that some
    /// label was out of range); under DP's rules the row is dropped.
    #[test]
    fn a_label_outside_the_models_classes_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        std::fs::write(&path, "1,0\n2,1\n3,2\n").unwrap();
        let mut src = DatasetSource::csv(path.clone());
        assert_eq!(src.load().unwrap().len(), 3, "no classes given: every label is read");
        src.label_classes = Some(2);
        let e = src.load().unwrap_err().to_string();
        assert!(e.contains("rows.csv:3") && e.contains("label 2 is outside the model's 2 classes"), "{e}");
        src.label_classes = Some(3);
        assert_eq!(src.load().unwrap().len(), 3);
        let ruled = DatasetSource { drop_invalid_rows: Some(RowRules { features: 1, classes: 2 }), ..src };
        let (train, _, dropped) = ruled.load_split_counted(0.0, 1).unwrap();
        assert_eq!((train.len(), dropped), (2, 1), "under rules the row is dropped, not the file failed");
    }

    /// Gzip is known by its magic bytes, whatever the file's name (read as
    /// text, under DP every line would be dropped as malformed), and batch
    /// names match in any case.
    #[test]
    fn gzip_is_read_by_its_content_and_batch_names_match_in_any_case() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"1,2,0\n3,4,1\n").unwrap();
        let bytes = gz.finish().unwrap();
        for name in ["plain-name.csv", "upper.CSV.GZ"] {
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let ds = Dataset::load_csv(&path, &CsvOptions::default()).unwrap();
            assert_eq!((ds.len(), ds.num_features), (2, 2), "{name}");
        }
        for name in ["b.csv", "B.CSV", "b.Csv.Gz", "b.csv.gz"] {
            assert!(is_batch_name(name), "{name}");
        }
        for name in [".b.csv", "b.csv.tmp", "b.txt", "b.gz"] {
            assert!(!is_batch_name(name), "{name}");
        }
    }

    /// A FIFO (or device) is not read: named like a batch it is not one,
    /// and given as a file it is refused, where reading it would block.
    #[cfg(unix)]
    #[test]
    fn a_fifo_is_neither_a_batch_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.csv"), "1,0\n").unwrap();
        let fifo = dir.path().join("b.csv");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo (coreutils)");
        assert!(made.success());
        let src = DatasetSource::csv(dir.path().to_owned());
        assert_eq!(src.batches().unwrap(), vec![dir.path().join("a.csv")]);
        let e = DatasetSource::csv(fifo.clone()).load().unwrap_err().to_string();
        assert!(e.contains("b.csv") && e.contains("not a regular file"), "{e}");
    }

    /// A file, or a gzip file's text, above the data set's `max_bytes` is
    /// refused naming the file and the setting (a gzip bomb never inflates
    /// past it).
    #[test]
    fn a_file_or_its_gzip_text_above_max_bytes_is_refused() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("big.csv");
        std::fs::write(&plain, "1,0\n".repeat(100)).unwrap();
        let bomb = dir.path().join("bomb.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all("1,0\n".repeat(100_000).as_bytes()).unwrap();
        std::fs::write(&bomb, gz.finish().unwrap()).unwrap();
        for path in [&plain, &bomb] {
            let src = DatasetSource { max_bytes: Some(300), ..DatasetSource::csv(path.clone()) };
            let e = src.load().unwrap_err().to_string();
            assert!(e.contains(&*path.to_string_lossy()) && e.contains("more than 300 bytes"), "{e}");
            assert!(e.contains("max_bytes"), "{e}");
            let within = DatasetSource { max_bytes: Some(1 << 20), ..DatasetSource::csv(path.clone()) };
            assert!(within.load().is_ok());
        }
    }

    /// A data set of `n` rows of 3 features from `seed`, some rows repeated.
    fn rows(n: usize, seed: u64) -> Dataset {
        use rand::{Rng as _, SeedableRng as _};
        let mut g = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut ds = Dataset { num_features: 3, ..Dataset::default() };
        for i in 0..n {
            if i > 0 && g.random_bool(0.05) {
                let j = g.random_range(0..i);
                let row = ds.row(j).to_vec();
                ds.features.extend_from_slice(&row);
                ds.labels.push(ds.labels[j]);
            } else {
                ds.features.extend((0..3).map(|_| g.random_range(-5.0f32..5.0)));
                ds.labels.push(g.random_range(0..3));
            }
        }
        ds
    }

    /// The rows of `ds` but row `i` (its neighbour; `ds` is the neighbour
    /// with a row added there).
    fn without(ds: &Dataset, i: usize) -> Dataset {
        let keep: Vec<usize> = (0..ds.len()).filter(|&k| k != i).collect();
        ds.select(&keep)
    }

    fn rows_of(ds: &Dataset) -> Vec<(Vec<u32>, u32)> {
        (0..ds.len()).map(|i| (ds.row(i).iter().map(|v| v.to_bits()).collect(), ds.labels[i])).collect()
    }

    /// What example-level DP needs of the split: data sets that differ by
    /// one row (removed anywhere, or added anywhere) split into training
    /// sets, and held-out sets, that differ by at most that row, in the
    /// same order, whatever the seed and fraction. (A seeded shuffle of
    /// positions, the split before this one, fails it: one row removed
    /// moves every later row's position.)
    #[test]
    fn neighbouring_data_sets_split_into_neighbouring_sides() {
        for (case, fraction) in [0.1, 0.2, 0.5, 0.89].into_iter().enumerate() {
            let ds = rows(300, case as u64);
            let seed = 1000 + case as u64;
            let (train, held) = ds.split(fraction, seed);
            assert_eq!(train.len() + held.len(), ds.len());
            for i in [0, 1, 7, 150, 299] {
                let smaller = without(&ds, i);
                let (t2, h2) = smaller.split(fraction, seed);
                let (t, h) = (rows_of(&train), rows_of(&held));
                let removed = &rows_of(&ds)[i];
                // The row removed left exactly one side, once; nothing else moved.
                let side_of_removed = if held.len() > h2.len() { (&h, rows_of(&h2)) } else { (&t, rows_of(&t2)) };
                let other = if held.len() > h2.len() { (&t, rows_of(&t2)) } else { (&h, rows_of(&h2)) };
                assert_eq!(other.0, &other.1, "fraction {fraction}, row {i}: the other side changed");
                assert_eq!(side_of_removed.0.len(), side_of_removed.1.len() + 1);
                let at = (0..side_of_removed.1.len())
                    .find(|&k| side_of_removed.0[k] != side_of_removed.1[k])
                    .unwrap_or(side_of_removed.1.len());
                assert_eq!(&side_of_removed.0[at], removed, "fraction {fraction}, row {i}");
                let mut rest = side_of_removed.0.clone();
                rest.remove(at);
                assert_eq!(rest, side_of_removed.1, "fraction {fraction}, row {i}: more than the row moved");
            }
        }
    }

    /// About `fraction` of the rows are held out (within 5 standard
    /// deviations of a binomial count: fails by chance with probability
    /// below 10^-6), another seed splits otherwise, and 0 holds out none.
    #[test]
    fn the_split_holds_out_about_the_fraction() {
        let ds = rows(20_000, 9);
        for fraction in [0.05, 0.2, 0.5] {
            let held = ds.split(fraction, 3).1.len() as f64;
            let (mean, sd) = (fraction * 20_000.0, (20_000.0 * fraction * (1.0 - fraction)).sqrt());
            assert!((held - mean).abs() < 5.0 * sd, "fraction {fraction}: {held} held out");
        }
        assert_ne!(rows_of(&ds.split(0.2, 3).1), rows_of(&ds.split(0.2, 4).1), "the seed matters");
        assert_eq!(ds.split(0.0, 3).1.len(), 0);
    }

    /// Under a DP job's rules each row that fails a check of its own is
    /// dropped, not a reason to refuse the data set: a wrong width (the
    /// one fixed in advance, even for the first row), a cell that is not a finite
    /// number, a label that is not a class index or not below the classes.
    /// The same file without the rules fails at its first bad line; with
    /// them, no valid row is an empty data set.
    #[test]
    fn a_dp_jobs_rows_that_fail_their_own_checks_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.csv");
        let text = "9,9,9,0\n1,2,0\n3,x,1\n4,inf,1\n5,6,7\n7,8,-1\n9,1,0.5\n2,2,2\n,3,1\n";
        std::fs::write(&path, text).unwrap();
        let mut src = DatasetSource::csv(path.clone());
        let e = src.load_split_counted(0.0, 1).unwrap_err().to_string();
        assert!(e.contains("rows.csv:2") && e.contains("3 columns"), "{e}");
        src.drop_invalid_rows = Some(RowRules { features: 2, classes: 3 });
        let (train, held, dropped) = src.load_split_counted(0.0, 1).unwrap();
        assert_eq!((train.features, train.labels, held.len(), dropped), (vec![1.0, 2.0, 2.0, 2.0], vec![0, 2], 0, 7));
        // A well-formed first row of another width does not fix the width.
        std::fs::write(&path, "9,9,9,1\n1,2,0\n3,4,1\n").unwrap();
        let (train, _, dropped) = src.load_split_counted(0.0, 1).unwrap();
        assert_eq!((train.labels, dropped), (vec![0, 1], 1));
        // Bytes that are not UTF-8 drop their row, not the file.
        std::fs::write(&path, b"1,2,0\n3,\xff,1\n5,6,1\n").unwrap();
        let (train, _, dropped) = src.load_split_counted(0.0, 1).unwrap();
        assert_eq!((train.labels, dropped), (vec![0, 1], 1));
        src.drop_invalid_rows = None;
        assert!(src.load_split_counted(0.0, 1).unwrap_err().to_string().contains("not UTF-8"));
        // No valid row is an empty data set at the fixed width, as is an
        // empty file; a layout that cannot fit the width fails whatever
        // the rows.
        src.drop_invalid_rows = Some(RowRules { features: 2, classes: 3 });
        for text in ["1,x,0\n5,6,7\n", ""] {
            std::fs::write(&path, text).unwrap();
            let (train, held, _) = src.load_split_counted(0.0, 1).unwrap();
            assert_eq!((train.len(), train.num_features, held.num_features), (0, 2, 2), "{text:?}");
        }
        src.drop_invalid_rows = Some(RowRules { features: 0, classes: 3 });
        assert!(src.load_split_counted(0.0, 1).unwrap_err().to_string().contains("at least one feature"));
        // A watched directory with no batch: no rows under the rules, an
        // error without them.
        let mut watched = DatasetSource::csv(dir.path().join("batches"));
        std::fs::create_dir(&watched.path).unwrap();
        assert!(watched.load_split_counted(0.0, 1).unwrap_err().to_string().contains("no CSV batches"));
        watched.drop_invalid_rows = Some(RowRules { features: 2, classes: 3 });
        assert_eq!(watched.load_split_counted(0.0, 1).unwrap().0.num_features, 2);
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
        // Each row's side is its own: about a quarter of 20 are held out.
        assert_eq!(t1.len() + h1.len(), 20);
        assert!((1..=10).contains(&h1.len()), "{} held out", h1.len());
        let mut all: Vec<f32> = t1.features.iter().chain(&h1.features).copied().collect();
        all.sort_by(f32::total_cmp);
        assert_eq!(all, ds.features);
        // The shuffle holds out exactly a quarter, the same for the seed.
        let (t, h) = ds.shuffle_split(0.25, 7);
        assert_eq!((t.len(), h.len()), (15, 5));
        assert_eq!(ds.shuffle_split(0.25, 7), (t.clone(), h.clone()));
        let mut all: Vec<f32> = t.features.iter().chain(&h.features).copied().collect();
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
