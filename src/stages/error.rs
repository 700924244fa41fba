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
    /// An engine's error (model, index, corpus, LLM, cache …), its causes kept for the terminal
    /// and the run log.
    #[error(transparent)]
    Engine(Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Hub(#[from] crate::model::error::HubError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
}

impl StageError {
    /// An engine's error as a stage failure, causes kept.
    pub fn engine(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Engine(Box::new(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading the model")]
    struct Loading(#[source] std::io::Error);

    /// The cause of an engine's error survives the stage boundary, for miette and the run log.
    #[test]
    fn an_engine_error_keeps_its_causes() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "config.json missing");
        let error = StageError::engine(Loading(missing));
        assert_eq!(error.to_string(), "loading the model");
        let cause = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("config.json missing"));
        assert_eq!(
            crate::error_chain(&error),
            "loading the model: config.json missing"
        );
    }
}
