//! The model registry: where fine-tuned models live once trained and evaluated, in a form that
//! ragd, sentence-transformers and other tools load directly.
//!
//! A registry is a folder (by default `$RAGD_HOME/models`, else `~/.ragd/models`) holding one
//! sentence-transformers model folder per name, each with the `training_metadata.json` the caller
//! supplied (recipe, lock and data hashes, base model, metrics, tool version). [`register`],
//! [`list`], [`show`], [`remove`] and [`export`] return data for the CLI to print; writes are
//! atomic (see `ops`). A reranker (a cross-encoder folder) registers beside the embedding model
//! its recipe trained. [`use_model`] points ragd's own config at a registered model with a
//! comment-preserving line edit. Nothing here prints or knows about recipes.

mod entry;
mod error;
mod lock;
mod name;
mod ops;
mod ragd_config;
mod tree;

pub use entry::{METADATA_FILE, ModelDetails, ModelEntry, REGISTERED_AT};
pub use error::RegistryError;
pub use name::{MAX_NAME_LEN, validate_name};
pub use ops::{
    REGRESSION_KEY, REQUIRED_FILES, RERANKER_KEY, UseOutcome, WEIGHT_FILES, default_ragd_home,
    default_root, export, in_use, list, register, register_with, remove, role_of, show,
    use_registered,
};
pub use ragd_config::{
    BACKUP_FILE, CONFIG_FILE, CUSTOM_MODEL, ConfigUpdate, ModelRole, backup_config,
    configured_models, use_model, use_ollama_model,
};
