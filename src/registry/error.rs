//! Errors of the model registry and of pointing ragd's config at a model.

use std::path::PathBuf;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid model name `{name}`: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("no model `{name}` in the registry at `{}`", root.display())]
    NotFound { name: String, root: PathBuf },
    #[error("model `{name}` is already registered at `{}` (replace it with force)", path.display())]
    Exists { name: String, path: PathBuf },
    #[error("`{}` is not a sentence-transformers model or cross-encoder folder: `{missing}` is missing", path.display())]
    NotAModel { path: PathBuf, missing: String },
    #[error("training metadata must be a JSON object, not {found}")]
    MetadataNotObject { found: &'static str },
    #[error("export destination `{}` exists and is not an empty folder", path.display())]
    DestinationNotEmpty { path: PathBuf },
    #[error("cannot find the home folder: set `RAGD_HOME`")]
    NoHome,
    #[error("path `{}` is not valid UTF-8, which ragd's config cannot hold", path.display())]
    NonUtf8Path { path: PathBuf },
    #[error("`{}` is not valid YAML: {message}", path.display())]
    ConfigInvalidYaml { path: PathBuf, message: String },
    #[error("`{}` must be a mapping of settings at the top level", path.display())]
    ConfigNotAMapping { path: PathBuf },
    #[error("`{}` line {line}: `embedding` is written in flow style (`{{…}}`), which cannot be edited without losing comments; write it as an indented block", path.display())]
    ConfigFlowStyle { path: PathBuf, line: usize },
    #[error("`{}` line {line}: the section to edit holds `{found}`, not a block of settings", path.display())]
    ConfigEmbeddingNotABlock {
        path: PathBuf,
        line: usize,
        found: String,
    },
    #[error("editing `{}` would change more than the model settings it sets: {message}", path.display())]
    ConfigEditUnsafe { path: PathBuf, message: String },
    #[error("`{}` is a link to `{}`, outside the model folder: it is not copied (copy the file into the folder, or remove the link)", link.display(), target.display())]
    LinkOutside { link: PathBuf, target: PathBuf },
    #[error("cannot lock the registry at `{}`", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// From `fs_err`, whose message names the path.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
