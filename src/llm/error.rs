//! Errors of the LLM backends.

use std::path::PathBuf;

/// Why an LLM call (or loading a model for one) failed.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The server could not be reached, or answered with an error, after every retry.
    #[error("`{url}`: {message}")]
    Http { url: String, message: String },
    /// The server answered, but not with what its API promises.
    #[error("`{url}` answered with something unexpected: {message}")]
    Protocol { url: String, message: String },
    /// The model is not on the server.
    #[error("the server `{url}` has no model `{model}` (it has: {available})")]
    UnknownModel {
        url: String,
        model: String,
        available: String,
    },
    /// The GGUF file cannot be used.
    #[error("`{}`: {message}", path.display())]
    BadModel { path: PathBuf, message: String },
    /// The request asks for something this backend cannot do (a JSON schema outside the subset
    /// the local constrained decoder understands).
    #[error("{0}")]
    Unsupported(String),
    /// `api_key_env` names a variable that is not set.
    #[error("the environment variable `{0}` (named by `api_key_env`) is not set")]
    MissingApiKey(String),
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("the response cache `{}`", path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("interrupted")]
    Cancelled,
}

impl LlmError {
    /// Worth another try: the server may come back, or the next sample may be well formed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Http { .. })
    }
}
