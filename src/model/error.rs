//! Errors of model resolution, loading and training.

use std::path::PathBuf;

/// Why a model reference could not be turned into files on disk.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("invalid model reference `{reference}`: {why}")]
    InvalidReference { reference: String, why: String },
    #[error("model path `{}` does not exist", path.display())]
    LocalMissing { path: PathBuf },
    #[error("`{repo}` is not in the Hugging Face cache at `{}` and HF_HUB_OFFLINE is set", cache.display())]
    NotCached { repo: String, cache: PathBuf },
    #[error("could not fetch `{repo}` from the Hugging Face hub: {message}")]
    Hub { repo: String, message: String },
    #[error("request to `{url}` failed: {message}")]
    Http { url: String, message: String },
    #[error("the index `{index}` has no pure-Python wheel for `{package}=={version}`")]
    NoWheel {
        package: String,
        version: String,
        index: String,
    },
    #[error("`{path}` is not in the wheel of `{package}=={version}`")]
    NotInWheel {
        package: String,
        version: String,
        path: String,
    },
    #[error("download of `{url}` has sha256 {actual}, the index says {expected}")]
    HashMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("`{}` is not a readable wheel: {message}", path.display())]
    BadWheel { path: PathBuf, message: String },
    #[error("I/O error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fs(#[from] std::io::Error),
}
