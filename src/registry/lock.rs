//! The registry's writer lock, and the cleanup of what an interrupted writer left behind.

use std::path::Path;

use fs_err as fs;

use super::error::RegistryError;

/// The lock file in the registry root.
pub(crate) const LOCK_NAME: &str = ".registry.lock";
/// Prefix of a model being copied in; renamed to its name when complete.
pub(crate) const STAGING_PREFIX: &str = ".tmp-";
/// Prefix of a model being deleted (renamed away first so its name disappears at once).
pub(crate) const TRASH_PREFIX: &str = ".trash-";

/// Exclusive right to change the registry. Writers hold it while they stage and rename; readers
/// never need it, since a model appears and disappears only by a rename. Dropping it unlocks.
#[derive(Debug)]
pub(crate) struct RegistryLock {
    _file: fs::File,
}

impl RegistryLock {
    /// Waits for the lock, then removes whatever staging or trash folders an interrupted writer
    /// left: with the lock held, no other writer can still be using them.
    ///
    /// The lock file marks a folder as a registry: a folder that had none before this call (a
    /// new registry, or one pointed at by mistake) is never cleaned, since no writer of ours can
    /// have left anything in it.
    pub(crate) fn acquire(root: &Path) -> Result<Self, RegistryError> {
        let was_registry = root.join(LOCK_NAME).is_file();
        let file = Self::open(root)?;
        file.file().lock().map_err(|source| RegistryError::Lock {
            path: file.path().to_path_buf(),
            source,
        })?;
        if was_registry {
            remove_leftovers(root)?;
        }
        Ok(Self { _file: file })
    }

    /// Cleans up as [`Self::acquire`] does when no writer is busy, and otherwise leaves things
    /// alone: for `list`, which must not wait on a long copy. Housekeeping only, so it gives up
    /// silently where it cannot write (a registry shared read-only).
    /// It creates nothing: a folder without the lock file is not a registry, and is left alone.
    pub(crate) fn tidy(root: &Path) {
        let Ok(file) = fs::OpenOptions::new()
            .write(true)
            .open(root.join(LOCK_NAME))
        else {
            return;
        };
        if file.file().try_lock().is_ok() {
            let _ = remove_leftovers(root);
        }
    }

    /// Shares the lock with other readers, excluding writers: for a reader that must not see a
    /// model swapped in the middle of reading it (export). Without a lock file no writer has ever
    /// run; where the file cannot be opened the registry is read-only to us: no lock then.
    pub(crate) fn shared(root: &Path) -> Result<Option<Self>, RegistryError> {
        let path = root.join(LOCK_NAME);
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        file.file()
            .lock_shared()
            .map_err(|source| RegistryError::Lock { path, source })?;
        Ok(Some(Self { _file: file }))
    }

    fn open(root: &Path) -> Result<fs::File, RegistryError> {
        fs::create_dir_all(root)?;
        Ok(fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(root.join(LOCK_NAME))?)
    }
}

/// Removes the staging and trash folders of interrupted writers: only real folders (not links)
/// whose whole name is one [`super::tree::unique_path`] makes, so that another tool's `.tmp-x`
/// beside the models is never touched.
fn remove_leftovers(root: &Path) -> Result<(), RegistryError> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_leftover(name) && entry.file_type()?.is_dir() {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}

/// Whether `name` reads `.tmp-<model>-<pid>-<n>` or `.trash-<model>-<pid>-<n>`, with `<model>` a
/// valid model name and `<pid>`, `<n>` decimal numbers.
fn is_leftover(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix(STAGING_PREFIX)
        .or_else(|| name.strip_prefix(TRASH_PREFIX))
    else {
        return false;
    };
    let number = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let mut parts = rest.rsplitn(3, '-');
    let (Some(counter), Some(pid), Some(model)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    number(counter) && number(pid) && super::name::validate_name(model).is_ok()
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_reader_holds_writers_off_until_it_is_done() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        assert!(RegistryLock::shared(&root).expect("no lock file").is_none());
        drop(RegistryLock::acquire(&root).expect("creates the lock file"));
        let reader = RegistryLock::shared(&root)
            .expect("locks")
            .expect("the lock file exists");
        let (done, finished) = mpsc::channel();
        let writer = std::thread::spawn(move || {
            let _lock = RegistryLock::acquire(&root).expect("locks");
            done.send(()).expect("the test waits");
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "a writer got in while a reader held the lock"
        );
        drop(reader);
        finished
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer proceeds once the reader is done");
        writer.join().expect("writer finished");
    }
}
