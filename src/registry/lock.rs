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
    pub(crate) fn acquire(root: &Path) -> Result<Self, RegistryError> {
        let file = Self::open(root)?;
        file.file().lock().map_err(|source| RegistryError::Lock {
            path: file.path().to_path_buf(),
            source,
        })?;
        remove_leftovers(root)?;
        Ok(Self { _file: file })
    }

    /// Cleans up as [`Self::acquire`] does when no writer is busy, and otherwise leaves things
    /// alone: for readers, which must not wait on a long copy.
    pub(crate) fn tidy(root: &Path) -> Result<(), RegistryError> {
        if !root.is_dir() {
            return Ok(());
        }
        let file = Self::open(root)?;
        if file.file().try_lock().is_ok() {
            remove_leftovers(root)?;
        }
        Ok(())
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

fn remove_leftovers(root: &Path) -> Result<(), RegistryError> {
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(STAGING_PREFIX) || name.starts_with(TRASH_PREFIX) {
            fs::remove_dir_all(entry.path())?;
        }
    }
    Ok(())
}
