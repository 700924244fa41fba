//! The cache: content digests of inputs (`digest`), stage keys (`key`), the artifact store and
//! workdir lock (`store`), the lock file beside a recipe (`lock`), and journals that let an
//! interrupted stage resume (`journal`), and corpus embeddings shared between stages
//! (`embeddings`), and the machine's measured speeds that estimates read (`speeds`).

pub mod digest;
pub mod embeddings;
pub mod error;
pub mod journal;
pub mod key;
pub mod lock;
pub mod speeds;
pub mod store;

use std::io::Write;
use std::path::Path;

use fs_err as fs;

/// Writes a file so that readers see the old or the new content, never a mix: a temporary file in
/// the same folder, synced, then renamed over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut file = fs::File::create(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temp, path)?;
    Ok(())
}
