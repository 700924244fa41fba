//! The content-addressed artifact store under the workdir.
//!
//! ```text
//! <workdir>/
//!   run.lock               held by the one run that may write (others wait)
//!   store-v1/<key>/        committed artifacts, each with MANIFEST_NAME
//!   tmp-v1/<key>/out/      a stage's output while it runs
//!   tmp-v1/<key>/journal/  what a stage records to resume after an interruption
//!   keys-v1/<key>.json     the KeyRecord of each key ever planned
//!   digests-v1.json        the stat memo of file digests
//!   shared-v1/             caches that outlive keys (LLM responses)
//!   runs/                  one JSONL event log per run
//! ```
//!
//! A stage writes into `tmp-v1/<key>/out`; only after it succeeded are the files hashed into a
//! manifest, synced, and the folder renamed into `store-v1/<key>` — one atomic step, so a crash or
//! `kill -9` at any moment leaves either no artifact or a whole one. The path versions (`-v1`) are
//! bumped when a layout changes, which orphans old entries instead of misreading them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use fs_err as fs;
use serde::{Deserialize, Serialize};

use super::digest::{DigestMemo, FileDigest, hash_bytes, list_files};
use super::error::CacheError;

/// The manifest file inside every committed artifact.
pub const MANIFEST_NAME: &str = "ragd-artifact.json";

/// What a committed artifact holds, written last before the commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub kind: String,
    pub key: String,
    pub created: String,
    /// Relative path → digest and size of every file except the manifest.
    pub files: BTreeMap<String, FileDigest>,
    /// The digest of the file listing: the artifact's output hash in the lock.
    pub digest: String,
    /// Artifact → the output digest of the upstream artifact this one was computed from. The
    /// key names upstream *keys*, which stay the same when a stage that is not bit-reproducible
    /// (an LLM sampling without a seed, training) reruns under its key and produces other
    /// bytes; these digests tell such a dependent from one built from the bytes there now.
    /// Empty in manifests written before it existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumed: BTreeMap<String, String>,
    /// The stage's summary (counts, figures).
    pub summary: serde_json::Value,
}

impl Manifest {
    pub fn bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }
}

/// The result of checking a committed artifact against its manifest.
#[derive(Debug)]
pub enum Verification {
    Missing,
    Valid(Manifest),
    /// Present but damaged: a file missing, changed, or the manifest unreadable.
    Corrupt {
        reason: String,
    },
}

/// A stage's folders while it runs.
#[derive(Debug, Clone)]
pub struct Staging {
    pub key: String,
    pub root: PathBuf,
    pub out_dir: PathBuf,
    pub journal_dir: PathBuf,
}

/// What [`Store::collect_garbage`] removed (or would).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collected {
    pub removed: usize,
    pub bytes: u64,
    /// Keys still referenced, by this many existing lock files.
    pub kept: usize,
    pub locks: usize,
}

/// The store of one workdir.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the store folders under `workdir`.
    pub fn open(workdir: &Path) -> Result<Self, CacheError> {
        for dir in ["store-v1", "tmp-v1", "keys-v1", "shared-v1", "runs"] {
            fs::create_dir_all(workdir.join(dir))?;
        }
        Ok(Self {
            root: workdir.to_path_buf(),
        })
    }

    /// The store of `workdir` without creating anything, for read-only commands.
    pub fn at(workdir: &Path) -> Self {
        Self {
            root: workdir.to_path_buf(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn artifact_dir(&self, key: &str) -> PathBuf {
        self.root.join("store-v1").join(key)
    }

    pub fn shared_dir(&self) -> PathBuf {
        self.root.join("shared-v1")
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    pub fn memo_path(&self) -> PathBuf {
        self.root.join("digests-v1.json")
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root.join("keys-v1").join(format!("{key}.json"))
    }

    /// Checks a committed artifact: every listed file present with its size and digest (through
    /// the stat memo, so an untouched artifact is not re-read), and nothing else claimed.
    pub fn verify(&self, key: &str, memo: &mut DigestMemo) -> Verification {
        let dir = self.artifact_dir(key);
        if !dir.exists() {
            return Verification::Missing;
        }
        let manifest: Manifest = match fs::read(dir.join(MANIFEST_NAME))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(manifest) => manifest,
            Err(reason) => {
                return Verification::Corrupt {
                    reason: format!("manifest unreadable: {reason}"),
                };
            }
        };
        if manifest.key != key {
            return Verification::Corrupt {
                reason: format!("manifest names key {}", manifest.key),
            };
        }
        let paths: Vec<PathBuf> = manifest.files.keys().map(|p| dir.join(p)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Verification::Corrupt {
                reason: format!("`{}` is missing", display_relative(missing, &dir)),
            };
        }
        let digests = match memo.digest_all(&paths) {
            Ok(digests) => digests,
            Err(error) => {
                return Verification::Corrupt {
                    reason: error.to_string(),
                };
            }
        };
        for ((name, expected), actual) in manifest.files.iter().zip(&digests) {
            if expected != actual {
                return Verification::Corrupt {
                    reason: format!("`{name}` does not match its recorded hash"),
                };
            }
        }
        Verification::Valid(manifest)
    }

    /// Prepares the folders for running `key`: a fresh `out/`, and the `journal/` of an earlier
    /// interrupted attempt kept as it was.
    pub fn begin(&self, key: &str) -> Result<Staging, CacheError> {
        let root = self.root.join("tmp-v1").join(key);
        let out_dir = root.join("out");
        let journal_dir = root.join("journal");
        if out_dir.exists() {
            fs::remove_dir_all(&out_dir)?;
        }
        fs::create_dir_all(&out_dir)?;
        fs::create_dir_all(&journal_dir)?;
        Ok(Staging {
            key: key.to_owned(),
            root,
            out_dir,
            journal_dir,
        })
    }

    /// Hashes the finished output, writes its manifest, syncs, and renames it into the store.
    /// A damaged artifact already under the key is replaced.
    /// `consumed` records the upstream output digests the stage read (see [`Manifest::consumed`]).
    pub fn commit(
        &self,
        staging: &Staging,
        kind: &str,
        summary: serde_json::Value,
        consumed: BTreeMap<String, String>,
    ) -> Result<Manifest, CacheError> {
        let relative = list_files(&staging.out_dir)?;
        let mut memo = DigestMemo::in_memory();
        let absolute: Vec<PathBuf> = relative.iter().map(|p| staging.out_dir.join(p)).collect();
        let digests = memo.digest_all(&absolute)?;
        for path in &absolute {
            fs::File::open(path)?.sync_all()?;
        }
        let files: BTreeMap<String, FileDigest> = relative
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .zip(digests)
            .collect();
        let listing = serde_json::to_vec(&files)?;
        let manifest = Manifest {
            kind: kind.to_owned(),
            key: staging.key.clone(),
            created: jiff::Timestamp::now().to_string(),
            files,
            digest: hash_bytes(&listing),
            consumed,
            summary,
        };
        let manifest_path = staging.out_dir.join(MANIFEST_NAME);
        let mut file = fs::File::create(&manifest_path)?;
        file.write_all(&serde_json::to_vec_pretty(&manifest)?)?;
        file.sync_all()?;
        sync_dir(&staging.out_dir)?;

        let target = self.artifact_dir(&staging.key);
        if target.exists() {
            // A corrupt artifact under this key: move it aside first so the rename cannot fail
            // on a non-empty target, then delete it.
            let aside = staging.root.join("replaced");
            if aside.exists() {
                fs::remove_dir_all(&aside)?;
            }
            fs::rename(&target, &aside)?;
            fs::remove_dir_all(&aside)?;
        }
        fs::rename(&staging.out_dir, &target)?;
        sync_dir(&self.root.join("store-v1"))?;
        fs::remove_dir_all(&staging.root)?;
        Ok(manifest)
    }

    /// Deletes a committed artifact (when it is corrupt, or forced, before recomputing it).
    /// One rename first takes it out of the store, so a kill mid-delete cannot leave half an
    /// artifact there; the remains in the key's staging folder go with its next commit.
    pub fn remove(&self, key: &str) -> Result<(), CacheError> {
        let dir = self.artifact_dir(key);
        if dir.exists() {
            let aside = self.root.join("tmp-v1").join(key).join("discarded");
            if aside.exists() {
                fs::remove_dir_all(&aside)?;
            }
            fs::create_dir_all(self.root.join("tmp-v1").join(key))?;
            fs::rename(&dir, &aside)?;
            fs::remove_dir_all(&aside)?;
        }
        Ok(())
    }

    pub fn save_record(&self, key: &str, record: &super::key::KeyRecord) -> Result<(), CacheError> {
        super::write_atomic(&self.record_path(key), &serde_json::to_vec_pretty(record)?)?;
        Ok(())
    }

    pub fn load_record(&self, key: &str) -> Option<super::key::KeyRecord> {
        let bytes = fs::read(self.record_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Keys of every committed artifact.
    pub fn keys(&self) -> Result<Vec<String>, CacheError> {
        let dir = self.root.join("store-v1");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                keys.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Keys with an interrupted run's folder (journal) waiting.
    pub fn staged_keys(&self) -> Result<Vec<String>, CacheError> {
        let dir = self.root.join("tmp-v1");
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut keys = Vec::new();
        for entry in fs::read_dir(dir)? {
            keys.push(entry?.file_name().to_string_lossy().into_owned());
        }
        keys.sort();
        Ok(keys)
    }

    /// Where the lock files that used this workdir are listed (for `gc`).
    fn locks_list(&self) -> PathBuf {
        self.root.join("locks-v1.json")
    }

    /// The lock files that have used this workdir.
    pub fn registered_locks(&self) -> Vec<PathBuf> {
        fs::read(self.locks_list())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Adds `lock_path` to the workdir's list of lock files, so `gc` keeps what it references.
    pub fn register_lock(&self, lock_path: &Path) -> Result<(), CacheError> {
        let mut locks = self.registered_locks();
        let lock_path = std::path::absolute(lock_path)?;
        if !locks.contains(&lock_path) {
            locks.push(lock_path);
            super::write_atomic(&self.locks_list(), &serde_json::to_vec_pretty(&locks)?)?;
        }
        Ok(())
    }

    /// Removes every artifact, staging folder and key record that none of the workdir's lock
    /// files nor `also_keep` (a lock not yet listed) references; with `dry_run` only measures
    /// them. The caller holds the workdir lock.
    pub fn collect_garbage(
        &self,
        also_keep: &Path,
        dry_run: bool,
    ) -> Result<Collected, CacheError> {
        let mut locks = self.registered_locks();
        let own = std::path::absolute(also_keep).unwrap_or_else(|_| also_keep.to_path_buf());
        if !locks.contains(&own) {
            locks.push(own);
        }
        let referenced = super::lock::referenced_keys(&locks);
        let mut keys = self.keys()?;
        keys.extend(self.staged_keys()?);
        keys.sort();
        keys.dedup();
        let mut collected = Collected {
            kept: referenced.len(),
            locks: locks.iter().filter(|l| l.exists()).count(),
            ..Collected::default()
        };
        for key in keys.iter().filter(|k| !referenced.contains_key(*k)) {
            collected.removed += 1;
            collected.bytes += if dry_run {
                dir_size(&self.artifact_dir(key))
            } else {
                self.purge(key)?
            };
        }
        Ok(collected)
    }

    /// Removes an artifact, its record, and any staging folder of a key; returns the bytes freed.
    pub fn purge(&self, key: &str) -> Result<u64, CacheError> {
        let mut freed = 0;
        let artifact = self.artifact_dir(key);
        if artifact.exists() {
            freed += dir_size(&artifact);
            self.remove(key)?;
        }
        let staging = self.root.join("tmp-v1").join(key);
        if staging.exists() {
            freed += dir_size(&staging);
            fs::remove_dir_all(&staging)?;
        }
        let record = self.record_path(key);
        if record.exists() {
            fs::remove_file(record)?;
        }
        Ok(freed)
    }
}

/// Total size of the files under `dir`.
pub fn dir_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(std::fs::Metadata::is_file)
        .map(|m| m.len())
        .sum()
}

fn display_relative(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Makes a rename or a new file in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Exclusive ownership of a workdir for one run. Dropping it releases the lock.
#[derive(Debug)]
pub struct WorkdirLock {
    _file: fs::File,
}

/// How to take the workdir lock when another run holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// Wait for the other run to finish (after telling the user).
    Wait,
    /// Fail at once with a clear message.
    Fail,
}

impl WorkdirLock {
    /// Takes the lock. When another process holds it, `on_wait` is told its pid before waiting.
    pub fn acquire(
        workdir: &Path,
        wait: LockWait,
        on_wait: &mut dyn FnMut(Option<u32>),
    ) -> Result<Self, CacheError> {
        fs::create_dir_all(workdir)?;
        let path = workdir.join("run.lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        match file.file().try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                if wait == LockWait::Fail {
                    return Err(CacheError::Busy {
                        workdir: workdir.to_path_buf(),
                        pid: holder,
                    });
                }
                on_wait(holder);
                file.file().lock().map_err(|source| CacheError::Lock {
                    path: path.clone(),
                    source,
                })?;
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(CacheError::Lock { path, source });
            }
        }
        let mut file = file;
        file.file().set_len(0)?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(store: &Store, key: &str, content: &str) -> Staging {
        let staging = store.begin(key).expect("begin");
        fs::write(staging.out_dir.join("data.txt"), content).expect("write");
        staging
    }

    #[test]
    fn commit_then_verify_then_detect_corruption() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let staging = staged(&store, "k1", "hello");
        let manifest = store
            .commit(
                &staging,
                "chunk",
                serde_json::json!({"n": 1}),
                BTreeMap::new(),
            )
            .expect("commit");
        assert!(!staging.root.exists(), "staging folder removed");
        let mut memo = DigestMemo::in_memory();
        assert!(matches!(store.verify("k1", &mut memo), Verification::Valid(m) if m == manifest));

        fs::write(store.artifact_dir("k1").join("data.txt"), "hellp").expect("corrupt");
        let mut memo = DigestMemo::in_memory();
        assert!(matches!(
            store.verify("k1", &mut memo),
            Verification::Corrupt { .. }
        ));

        fs::remove_file(store.artifact_dir("k1").join("data.txt")).expect("delete");
        assert!(matches!(
            store.verify("k1", &mut memo),
            Verification::Corrupt { .. }
        ));
        assert!(matches!(
            store.verify("k2", &mut memo),
            Verification::Missing
        ));
    }

    #[test]
    fn begin_keeps_the_journal_of_an_interrupted_attempt() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let first = staged(&store, "k", "partial");
        fs::write(first.journal_dir.join("done.jsonl"), "{}\n").expect("journal");
        let second = store.begin("k").expect("begin again");
        assert!(second.journal_dir.join("done.jsonl").exists());
        assert!(
            !second.out_dir.join("data.txt").exists(),
            "out starts fresh"
        );
    }

    #[test]
    fn committing_over_a_corrupt_artifact_replaces_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        store
            .commit(
                &staged(&store, "k", "one"),
                "chunk",
                serde_json::Value::Null,
                BTreeMap::new(),
            )
            .expect("first");
        fs::write(store.artifact_dir("k").join("data.txt"), "bad").expect("corrupt");
        store
            .commit(
                &staged(&store, "k", "one"),
                "chunk",
                serde_json::Value::Null,
                BTreeMap::new(),
            )
            .expect("second");
        let mut memo = DigestMemo::in_memory();
        assert!(matches!(
            store.verify("k", &mut memo),
            Verification::Valid(_)
        ));
    }

    #[test]
    fn a_second_lock_fails_or_waits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let held = WorkdirLock::acquire(dir.path(), LockWait::Fail, &mut |_| {}).expect("first");
        let err = WorkdirLock::acquire(dir.path(), LockWait::Fail, &mut |_| {})
            .expect_err("second fails");
        assert!(
            matches!(err, CacheError::Busy { pid: Some(pid), .. } if pid == std::process::id()),
            "{err}"
        );
        drop(held);
        WorkdirLock::acquire(dir.path(), LockWait::Fail, &mut |_| {}).expect("free again");
    }
}
