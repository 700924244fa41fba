//! What the registry tells about a model, read from its `training_metadata.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fs_err as fs;
use serde::{Deserialize, Serialize};

/// The metadata file in every registered model folder.
pub const METADATA_FILE: &str = "training_metadata.json";

/// The key the registry adds to the caller's metadata: when the model was registered (RFC 3339).
pub const REGISTERED_AT: &str = "registered_at";

/// One registered model, as `list` shows it.
///
/// Read from the caller's metadata: `base_model` (a string) and `metrics` (an object whose
/// numeric leaves are summarised under dotted keys, `{"fine_tuned": {"ndcg@10": 0.8}}` giving
/// `fine_tuned.ndcg@10`); `created` is the registry's own [`REGISTERED_AT`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub created: Option<jiff::Timestamp>,
    pub base_model: Option<String>,
    pub metrics: BTreeMap<String, f64>,
    /// The evaluation's verdict (`better`, `no clear difference`, `worse`), else what its
    /// regression flag says (`worse`, `not worse`); `None` when it was not evaluated.
    #[serde(default)]
    pub verdict: Option<String>,
    /// Why the metadata could not be read (a folder copied in by hand), if it could not.
    pub problem: Option<String>,
}

/// One model with its full metadata, as `show` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDetails {
    pub entry: ModelEntry,
    /// The whole `training_metadata.json`, or null when it is missing or unreadable.
    pub metadata: serde_json::Value,
}

/// Reads the model folder `path` named `name`.
pub(crate) fn read_details(name: &str, path: &Path) -> ModelDetails {
    let mut entry = ModelEntry {
        name: name.to_owned(),
        path: path.to_path_buf(),
        created: None,
        base_model: None,
        metrics: BTreeMap::new(),
        verdict: None,
        problem: None,
    };
    let metadata = match read_metadata(&path.join(METADATA_FILE)) {
        Ok(metadata) => metadata,
        Err(problem) => {
            entry.problem = Some(problem);
            return ModelDetails {
                entry,
                metadata: serde_json::Value::Null,
            };
        }
    };
    entry.created = metadata[REGISTERED_AT]
        .as_str()
        .and_then(|s| s.parse().ok());
    entry.base_model = metadata["base_model"].as_str().map(str::to_owned);
    flatten_numbers("", &metadata["metrics"], &mut entry.metrics);
    entry.verdict = match (
        metadata["verdict"]["label"].as_str(),
        metadata[super::REGRESSION_KEY].as_bool(),
    ) {
        (Some(label), _) => Some(label.to_owned()),
        (None, Some(true)) => Some("worse".to_owned()),
        (None, Some(false)) => Some("not worse".to_owned()),
        (None, None) => None,
    };
    ModelDetails { entry, metadata }
}

fn read_metadata(path: &Path) -> Result<serde_json::Value, String> {
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("`{}`: {e}", path.display()))?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(format!("`{}` is not a JSON object", path.display()))
    }
}

fn flatten_numbers(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, f64>) {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_f64() {
                out.insert(prefix.to_owned(), n);
            }
        }
        serde_json::Value::Object(fields) => {
            for (key, child) in fields {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten_numbers(&path, child, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_flatten_to_dotted_numeric_leaves() {
        let mut out = BTreeMap::new();
        let metrics = serde_json::json!({
            "base": {"ndcg@10": 0.73, "note": "text is skipped"},
            "fine_tuned": {"ndcg@10": 0.81, "recall": {"@100": 0.98}},
            "steps": 1200
        });
        flatten_numbers("", &metrics, &mut out);
        assert_eq!(
            out,
            BTreeMap::from([
                ("base.ndcg@10".to_owned(), 0.73),
                ("fine_tuned.ndcg@10".to_owned(), 0.81),
                ("fine_tuned.recall.@100".to_owned(), 0.98),
                ("steps".to_owned(), 1200.0),
            ])
        );
    }

    #[test]
    fn a_folder_without_metadata_is_listed_with_its_problem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let details = read_details("hand-made", dir.path());
        assert!(details.entry.problem.is_some());
        assert_eq!(details.metadata, serde_json::Value::Null);
        fs::write(dir.path().join(METADATA_FILE), "[1]").expect("write");
        let details = read_details("hand-made", dir.path());
        assert!(
            details
                .entry
                .problem
                .is_some_and(|p| p.ends_with("is not a JSON object"))
        );
    }
}
