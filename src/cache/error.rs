//! Errors of the artifact store, lock files and journals.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum CacheError {
    #[error(
        "another ragd-pipe run{} is using the workdir `{}`",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        workdir.display()
    )]
    Busy { workdir: PathBuf, pid: Option<u32> },
    #[error("cannot lock `{}`", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lock file `{}` is not readable: {message}", path.display())]
    #[diagnostic(
        code(ragd::cache::bad_lock),
        help(
            "the lock only records what ran: restore it from version control, or move it aside and run again to write a new one (the store keeps every artifact, so nothing is recomputed that is still cached)"
        )
    )]
    BadLock { path: PathBuf, message: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
}
