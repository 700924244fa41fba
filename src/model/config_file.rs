//! Reading the JSON files of a model folder (`config.json`, `modules.json`, …) into typed structs.

use std::path::Path;

use fs_err as fs;
use serde::de::DeserializeOwned;

use crate::model::error::ModelError;

/// Reads and parses `path`; a parse error names the key it happened at (`hidden_size`, or `.` for
/// the whole document, e.g. a missing field), through `serde_path_to_error`.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path: path.to_owned(),
        });
    }
    let text = fs::read_to_string(path)?;
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| ModelError::BadConfig {
        path: path.to_owned(),
        key: error.path().to_string(),
        message: error.into_inner().to_string(),
    })
}
