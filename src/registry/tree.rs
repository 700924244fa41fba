//! Copying a model folder durably, and replacing one folder by another in a single step.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use fs_err as fs;

use super::error::RegistryError;

/// Copies every file under `from` into `to` (created), skipping the top-level files named in
/// `except`; then syncs each file and folder so that a rename of `to` afterwards publishes
/// complete data even across a power cut.
///
/// Links are followed only where they stay inside `from`: one that leads out of it is refused
/// with [`RegistryError::LinkOutside`], since copying it would turn whatever it points at (a key,
/// a dotfile) into a regular file of the model, to be exported or shared. Keeping such links as
/// links was the rejected alternative: the copy would then break, or leak, on another machine.
pub(crate) fn copy_tree(from: &Path, to: &Path, except: &[&str]) -> Result<(), RegistryError> {
    let root = fs::canonicalize(from)?;
    fs::create_dir_all(to)?;
    for entry in walkdir::WalkDir::new(from)
        .follow_links(true)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = entry.map_err(std::io::Error::other)?;
        let relative = entry
            .path()
            .strip_prefix(from)
            .expect("walkdir yields paths under its root");
        if entry.depth() == 1 && except.iter().any(|e| relative == Path::new(e)) {
            continue;
        }
        if entry.path_is_symlink() {
            let target = fs::canonicalize(entry.path())?;
            if !target.starts_with(&root) {
                return Err(RegistryError::LinkOutside {
                    link: entry.path().to_path_buf(),
                    target,
                });
            }
        }
        let target = to.join(relative);
        if entry.file_type().is_dir() {
            fs::create_dir_all(&target)?;
        } else if entry.file_type().is_file() {
            fs::copy(entry.path(), &target)?;
            fs::File::open(&target)?.sync_all()?;
        }
    }
    sync_folders(to)
}

/// Syncs `dir` and every folder under it, so the entries created in them are durable.
pub(crate) fn sync_folders(dir: &Path) -> Result<(), RegistryError> {
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(std::io::Error::other)?;
        if entry.file_type().is_dir() {
            sync_dir(entry.path())?;
        }
    }
    Ok(())
}

/// Makes renames and new entries in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), RegistryError> {
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// A fresh hidden name in `dir` with `prefix`, unique within this process and across processes.
pub(crate) fn unique_path(dir: &Path, prefix: &str, name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{prefix}{name}-{}-{n}", std::process::id()))
}

/// Puts the folder `new` at `target`, where a folder already is, and the old one at `new`'s path.
///
/// On Linux this is one `renameat2(RENAME_EXCHANGE)`: a reader of `target` sees the old model or
/// the new one, never neither. Elsewhere, or on file systems without the exchange, it is two
/// renames with a moment in between where `target` does not exist (a reader then gets "not
/// found", still never half a model). A symlink flipped atomically was the rejected alternative:
/// it makes every registered model a link, which tools that copy or watch folders handle poorly.
pub(crate) fn replace_folder(new: &Path, target: &Path) -> Result<(), RegistryError> {
    #[cfg(target_os = "linux")]
    if exchange(new, target).is_ok() {
        return Ok(());
    }
    let aside = unique_path(
        target.parent().unwrap_or(Path::new(".")),
        super::lock::TRASH_PREFIX,
        "replaced",
    );
    fs::rename(target, &aside)?;
    fs::rename(new, target)?;
    fs::rename(&aside, new)?;
    Ok(())
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both pointers are NUL-terminated strings that live across the call.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_two_folders() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (new, target) = (dir.path().join("new"), dir.path().join("target"));
        fs::create_dir(&new).expect("new");
        fs::write(new.join("v"), "2").expect("write");
        fs::create_dir(&target).expect("target");
        fs::write(target.join("v"), "1").expect("write");
        replace_folder(&new, &target).expect("replaces");
        assert_eq!(fs::read_to_string(target.join("v")).expect("read"), "2");
        assert_eq!(fs::read_to_string(new.join("v")).expect("read"), "1");
    }

    #[test]
    fn copy_skips_the_excepted_top_level_files_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let from = dir.path().join("from");
        fs::create_dir_all(from.join("1_Pooling")).expect("mkdir");
        fs::write(from.join("config.json"), "{}").expect("write");
        fs::write(from.join("skip.json"), "x").expect("write");
        fs::write(from.join("1_Pooling/skip.json"), "kept").expect("write");
        let to = dir.path().join("to");
        copy_tree(&from, &to, &["skip.json"]).expect("copies");
        assert!(to.join("config.json").is_file());
        assert!(!to.join("skip.json").exists());
        assert_eq!(
            fs::read_to_string(to.join("1_Pooling/skip.json")).expect("read"),
            "kept"
        );
    }
}
