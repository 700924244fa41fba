//! Journals: how a long stage survives an interruption. A stage appends each finished unit of
//! work (one LLM answer, one training checkpoint marker) to a JSONL file in its journal folder; a
//! rerun of the same key reads the records back and skips what is done. A record is one line
//! written with one `write` and flushed; a line torn by a kill is ignored on load.

use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fs_err as fs;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Records are flushed to the OS at once and synced to disk at most this often, so a crash of the
/// process loses nothing and a power cut loses at most this much work.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// An append-only JSONL journal of `T` records.
pub struct Journal<T> {
    path: PathBuf,
    file: fs::File,
    last_sync: Instant,
    _records: PhantomData<fn(T)>,
}

impl<T: Serialize + DeserializeOwned> Journal<T> {
    /// Opens (creating) the journal and returns the records already in it.
    pub fn open(path: &Path) -> std::io::Result<(Self, Vec<T>)> {
        let mut records = Vec::new();
        if path.exists() {
            let text = fs::read(path)?;
            let complete = match text.iter().rposition(|&b| b == b'\n') {
                Some(end) => &text[..=end],
                None => &[][..],
            };
            for line in complete.split(|&b| b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                // A line that does not parse was torn mid-write by a kill (or damaged): skip it,
                // its work is redone.
                if let Ok(record) = serde_json::from_slice(line) {
                    records.push(record);
                }
            }
            if complete.len() != text.len() {
                // Cut the torn tail so the next append starts on a fresh line.
                let file = fs::OpenOptions::new().write(true).open(path)?;
                file.set_len(complete.len() as u64)?;
            }
        }
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
                last_sync: Instant::now(),
                _records: PhantomData,
            },
            records,
        ))
    }

    /// Appends one record.
    pub fn append(&mut self, record: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.flush()?;
        if self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.file.sync_data()?;
            self.last_sync = Instant::now();
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl<T> Drop for Journal<T> {
    fn drop(&mut self) {
        // Best effort: the data is already with the OS; a failed sync only weakens power-cut safety.
        let _ = self.file.sync_data();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Done {
        id: u32,
    }

    #[test]
    fn reopens_with_every_record_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("j.jsonl");
        {
            let (mut journal, existing) = Journal::<Done>::open(&path).expect("open");
            assert!(existing.is_empty());
            for id in 0..3 {
                journal.append(&Done { id }).expect("append");
            }
        }
        // A kill in the middle of a write leaves half a line.
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"id\": 9"))
            .expect("tear");
        let (mut journal, existing) = Journal::<Done>::open(&path).expect("reopen");
        assert_eq!(
            existing,
            vec![Done { id: 0 }, Done { id: 1 }, Done { id: 2 }]
        );
        journal.append(&Done { id: 3 }).expect("append after tear");
        drop(journal);
        let (_, all) = Journal::<Done>::open(&path).expect("reopen again");
        assert_eq!(all.len(), 4);
    }
}
