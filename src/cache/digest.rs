//! Content digests of files, remembered by their `stat` so an unchanged 1 GB corpus is not re-read
//! on every run.
//!
//! The memo maps an absolute path to (size, modification time, inode) and the blake3 of the bytes
//! seen then. A file whose stat still matches is trusted; any write changes its mtime. Like git's
//! index, a file modified within the same clock tick as it was hashed could keep its stat, so a
//! file whose mtime is less than [`RACY_WINDOW`] old when hashed is not memoised.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use fs_err as fs;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Files modified more recently than this when hashed are rehashed next time.
const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Files this large are hashed through a memory map with rayon.
const MMAP_THRESHOLD: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

impl Stat {
    fn of(metadata: &std::fs::Metadata) -> Self {
        Self {
            size: metadata.len(),
            mtime_ns: i128::from(metadata.mtime()) * 1_000_000_000
                + i128::from(metadata.mtime_nsec()),
            inode: metadata.ino(),
        }
    }

    fn is_racy(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(i128::MAX);
        now - self.mtime_ns < RACY_WINDOW.as_nanos() as i128
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemoEntry {
    stat: Stat,
    blake3: String,
}

/// A file's digest and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub blake3: String,
    pub size: u64,
}

/// The stat-keyed memo of file digests, stored as JSON under the workdir.
#[derive(Debug, Default)]
pub struct DigestMemo {
    path: Option<PathBuf>,
    entries: HashMap<PathBuf, MemoEntry>,
    dirty: bool,
}

impl DigestMemo {
    /// Opens the memo at `path`; a missing or unreadable memo starts empty (it is only a cache).
    pub fn open(path: &Path) -> Self {
        let entries = fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        Self {
            path: Some(path.to_path_buf()),
            entries,
            dirty: false,
        }
    }

    /// A memo that is never saved, for one-off checks.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// The digest of one file.
    pub fn digest(&mut self, file: &Path) -> std::io::Result<FileDigest> {
        Ok(self
            .digest_all(std::slice::from_ref(&file.to_path_buf()))?
            .remove(0))
    }

    /// The digests of many files, in order; memo misses are hashed in parallel. The first file
    /// that cannot be read fails the whole call.
    pub fn digest_all(&mut self, files: &[PathBuf]) -> std::io::Result<Vec<FileDigest>> {
        self.try_digest_all(files).into_iter().collect()
    }

    /// The digest of each file, or why it could not be read, in order: for callers that skip
    /// unreadable files (a corpus) rather than stop at the first.
    pub fn try_digest_all(&mut self, files: &[PathBuf]) -> Vec<std::io::Result<FileDigest>> {
        let stats: Vec<std::io::Result<(PathBuf, Stat)>> = files
            .par_iter()
            .map(|file| {
                let absolute = std::path::absolute(file)?;
                let metadata = fs::metadata(&absolute)?;
                Ok((absolute, Stat::of(&metadata)))
            })
            .collect();
        let remembered = |(path, stat): &(PathBuf, Stat)| {
            self.entries
                .get(path)
                .filter(|entry| entry.stat == *stat)
                .map(|entry| FileDigest {
                    blake3: entry.blake3.clone(),
                    size: stat.size,
                })
        };
        let mut digests: Vec<Option<std::io::Result<FileDigest>>> = stats
            .iter()
            .map(|stat| match stat {
                Ok(stat) => remembered(stat).map(Ok),
                Err(e) => Some(Err(std::io::Error::new(e.kind(), e.to_string()))),
            })
            .collect();
        let missing: Vec<(usize, &PathBuf, Stat)> = stats
            .iter()
            .enumerate()
            .filter(|(i, _)| digests[*i].is_none())
            .filter_map(|(i, stat)| stat.as_ref().ok().map(|(path, stat)| (i, path, *stat)))
            .collect();
        let hashed: Vec<(usize, &PathBuf, Stat, std::io::Result<String>)> = missing
            .par_iter()
            .map(|&(i, path, stat)| (i, path, stat, hash_file(path, stat.size)))
            .collect();
        for (i, path, stat, result) in hashed {
            digests[i] = Some(result.map(|blake3| {
                if !stat.is_racy() {
                    self.entries.insert(
                        path.clone(),
                        MemoEntry {
                            stat,
                            blake3: blake3.clone(),
                        },
                    );
                    self.dirty = true;
                }
                FileDigest {
                    blake3,
                    size: stat.size,
                }
            }));
        }
        digests
            .into_iter()
            .map(|d| d.expect("every file has a digest or an error"))
            .collect()
    }

    /// Forgets files that no longer exist, so the memo does not grow without bound.
    pub fn prune(&mut self) {
        let before = self.entries.len();
        self.entries.retain(|path, _| path.exists());
        self.dirty |= self.entries.len() != before;
    }

    /// Writes the memo back if anything changed.
    pub fn save(&mut self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.entries).map_err(std::io::Error::other)?;
        super::write_atomic(path, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}

/// blake3 of a file's bytes, hex.
fn hash_file(path: &Path, size: u64) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    if size >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update(&fs::read(path)?);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// blake3 of bytes, hex.
pub fn hash_bytes(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Every regular file under `dir`, relative to it, sorted; symlinks are followed.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(std::io::Error::other)?;
        if entry.file_type().is_file() {
            let relative = entry
                .path()
                .strip_prefix(dir)
                .map_err(std::io::Error::other)?
                .to_path_buf();
            files.push(relative);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_reuses_digests_until_a_file_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("a.txt");
        fs::write(&file, "one").expect("write");
        // Age the file past the racy window so it is memoised.
        let old = SystemTime::now() - Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.file().set_modified(old))
            .expect("set mtime");
        let memo_path = dir.path().join("memo.json");
        let mut memo = DigestMemo::open(&memo_path);
        let first = memo.digest(&file).expect("digest");
        assert_eq!(first.blake3, hash_bytes(b"one"));
        memo.save().expect("save");

        let mut reopened = DigestMemo::open(&memo_path);
        assert_eq!(reopened.entries.len(), 1, "memoised");
        assert_eq!(reopened.digest(&file).expect("digest"), first);

        fs::write(&file, "two").expect("rewrite");
        let changed = reopened.digest(&file).expect("digest");
        assert_eq!(changed.blake3, hash_bytes(b"two"));
    }

    #[test]
    fn recently_modified_files_are_not_memoised() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("fresh.txt");
        fs::write(&file, "fresh").expect("write");
        let mut memo = DigestMemo::in_memory();
        memo.digest(&file).expect("digest");
        assert!(memo.entries.is_empty());
    }
}
