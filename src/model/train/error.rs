//! Why training could not run or finish.

use std::path::PathBuf;

use crate::model::error::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training setting `{name}`: {why}")]
    InvalidConfig { name: &'static str, why: String },
    #[error("no batch can be formed: {why}")]
    NoBatches { why: String },
    #[error("`{name}` received no gradient: the model's graph does not reach it")]
    NoGradient { name: String },
    #[error("step {step}: the {what} is not finite ({value}); lower the learning rate")]
    NotFinite {
        step: u64,
        what: &'static str,
        value: f64,
    },
    #[error("stopped after step {step}")]
    Stopped { step: u64 },
    #[error("checkpoint `{}` is unusable: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    #[error("`{}` is unusable: {message}", path.display())]
    BadFile { path: PathBuf, message: String },
    #[error("cannot write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("JSON error")]
    Json(#[from] serde_json::Error),
}
