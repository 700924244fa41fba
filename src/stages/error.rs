//! Errors a stage returns to the executor.

use std::path::PathBuf;

use super::Artifact;

/// Why a stage failed. The executor keeps the stage's journal on any error, so a rerun resumes.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("interrupted")]
    Cancelled,
    #[error("the `{}` input was not provided to this stage", artifact.name())]
    MissingInput { artifact: Artifact },
    #[error("`{}` line {line}: {message}", path.display())]
    BadRecord {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Hub(#[from] crate::model::error::HubError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
}

/// An error and its causes on one line (`failed to load: file missing: x.json`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        source = cause.source();
    }
    message
}
