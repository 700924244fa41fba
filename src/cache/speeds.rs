//! How fast this machine did each kind of work, as runs and calibrations measured it, so that a
//! plan's time and memory estimate comes from this machine rather than the developers'.
//!
//! One small JSON file in ragd-pipe's own cache folder (`RAGD_CACHE_DIR`), shared by every recipe
//! and workdir on the machine. Entries are keyed by a readable string that names the work and its
//! shape (`encode sentence-transformers/all-MiniLM-L6-v2 128 2t`); the latest measurement wins. A
//! missing or unreadable book is an empty one: estimates then fall back to calibration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::write_atomic;

/// The file name inside the cache folder; the version moves when an entry's meaning changes.
const FILE: &str = "speeds-v1.json";

/// What measured a figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A real run of the work.
    Run,
    /// A short timing of the kernels at the work's shape.
    Calibration,
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub value: f64,
    pub source: Source,
    /// When it was measured (RFC 3339, UTC).
    pub at: String,
}

/// The machine's measured speeds.
#[derive(Debug, Clone, Default)]
pub struct SpeedBook {
    path: PathBuf,
    entries: BTreeMap<String, Measured>,
}

impl SpeedBook {
    /// The book in `cache_dir`, empty when there is none yet or it cannot be read.
    pub fn open(cache_dir: &Path) -> Self {
        let path = cache_dir.join(FILE);
        let entries = fs_err::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self { path, entries }
    }

    pub fn get(&self, key: &str) -> Option<&Measured> {
        self.entries.get(key)
    }

    /// Stores `value` under `key`, re-reading the file first so that entries another process
    /// recorded meanwhile are kept. A book that cannot be written is only a slower next estimate,
    /// so the error is returned for the caller to mention, never to fail on.
    pub fn record(&mut self, key: &str, value: f64, source: Source) -> std::io::Result<()> {
        let mut entries: BTreeMap<String, Measured> = fs_err::read(&self.path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let measured = Measured {
            value,
            source,
            at: jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string(),
        };
        entries.insert(key.to_owned(), measured);
        write_atomic(&self.path, &serde_json::to_vec_pretty(&entries)?)?;
        self.entries = entries;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_speed_is_read_back_by_a_later_book_and_others_entries_survive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut first = SpeedBook::open(dir.path());
        assert!(first.get("encode m 128 2t").is_none());
        let mut second = SpeedBook::open(dir.path());
        first
            .record("encode m 128 2t", 0.01, Source::Calibration)
            .expect("record");
        second
            .record("llm m local 32", 0.3, Source::Run)
            .expect("record");
        let reread = SpeedBook::open(dir.path());
        assert_eq!(reread.get("encode m 128 2t").map(|m| m.value), Some(0.01));
        assert_eq!(reread.get("llm m local 32").map(|m| m.value), Some(0.3));
    }

    #[test]
    fn an_unreadable_book_is_an_empty_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs_err::write(dir.path().join(FILE), "not json").expect("write");
        let book = SpeedBook::open(dir.path());
        assert!(book.get("anything").is_none());
    }
}
