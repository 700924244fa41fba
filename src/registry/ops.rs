//! The registry's operations: register, list, show, remove, export.
//!
//! ```text
//! <root>/
//!   .registry.lock         held by a writer (register, remove), shared by export
//!   <name>/                a sentence-transformers model folder + training_metadata.json, or a
//!                          cross-encoder folder (a reranker, `BertForSequenceClassification`)
//!   .tmp-<name>-<pid>-<n>/ a model being copied in (renamed to <name> when complete)
//!   .trash-<name>-<pid>-<n>/ a model being removed, or the old one a forced register replaced
//! ```
//!
//! A model appears, changes and disappears only by renames inside the root, after its files and
//! folders were synced; so a reader (ragd loading the model, `list`) sees a whole model or none,
//! and a crash leaves at most a hidden `.tmp-`/`.trash-` folder that the next writer removes.

use std::path::{Path, PathBuf};

use fs_err as fs;

use super::entry::{METADATA_FILE, ModelDetails, ModelEntry, REGISTERED_AT, read_details};
use super::error::RegistryError;
use super::lock::{RegistryLock, STAGING_PREFIX, TRASH_PREFIX};
use super::name::validate_name;
use super::ragd_config::{ConfigUpdate, ModelRole, use_model};
use super::tree::{copy_tree, replace_folder, sync_dir, unique_path};

/// Files a sentence-transformers model folder must hold to be registered; one of
/// [`WEIGHT_FILES`] too. A cross-encoder folder ([`role_of`]) needs no `modules.json`.
pub const REQUIRED_FILES: &[&str] = &["modules.json", "config.json"];

/// The metadata key of an embedding model that names the reranker registered beside it.
pub const RERANKER_KEY: &str = "reranker";
/// The metadata key that records the evaluation found the model worse than what it replaces.
pub const REGRESSION_KEY: &str = "evaluation_regression";
/// Weight files, of which a model folder must hold one.
pub const WEIGHT_FILES: &[&str] = &["model.safetensors", "pytorch_model.bin"];

/// `$RAGD_HOME`, else `~/.ragd`: where ragd keeps its config and models.
pub fn default_ragd_home() -> Result<PathBuf, RegistryError> {
    ragd_home_from(std::env::var_os("RAGD_HOME"), std::env::home_dir())
}

fn ragd_home_from(
    ragd_home: Option<std::ffi::OsString>,
    home: Option<PathBuf>,
) -> Result<PathBuf, RegistryError> {
    match ragd_home.filter(|h| !h.is_empty()) {
        Some(ragd_home) => Ok(PathBuf::from(ragd_home)),
        None => home
            .map(|home| home.join(".ragd"))
            .ok_or(RegistryError::NoHome),
    }
}

/// The default registry root: `models/` in [`default_ragd_home`].
pub fn default_root() -> Result<PathBuf, RegistryError> {
    Ok(default_ragd_home()?.join("models"))
}

/// The folder of a registered model, which must exist.
pub(crate) fn model_path(root: &Path, name: &str) -> Result<PathBuf, RegistryError> {
    let path = root.join(validate_name(name)?);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(RegistryError::NotFound {
            name: name.to_owned(),
            root: root.to_path_buf(),
        })
    }
}

/// What a model folder is for: a reranker when its `config.json` names a sequence-classification
/// architecture (how transformers and sentence-transformers' `CrossEncoder` save one), else an
/// embedding model.
pub fn role_of(model_dir: &Path) -> ModelRole {
    let architectures = fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|config| config.get("architectures").cloned());
    let classifies = architectures
        .as_ref()
        .and_then(serde_json::Value::as_array)
        .is_some_and(|names| {
            names
                .iter()
                .filter_map(serde_json::Value::as_str)
                .any(|name| name.ends_with("ForSequenceClassification"))
        });
    if classifies {
        ModelRole::Reranker
    } else {
        ModelRole::Embedding
    }
}

fn check_model_folder(model_dir: &Path) -> Result<(), RegistryError> {
    let missing = |missing: &str| RegistryError::NotAModel {
        path: model_dir.to_path_buf(),
        missing: missing.to_owned(),
    };
    let required: &[&str] = match role_of(model_dir) {
        ModelRole::Embedding => REQUIRED_FILES,
        ModelRole::Reranker => &["config.json"],
    };
    if let Some(file) = required.iter().find(|f| !model_dir.join(f).is_file()) {
        return Err(missing(file));
    }
    if !WEIGHT_FILES.iter().any(|f| model_dir.join(f).is_file()) {
        return Err(missing(&WEIGHT_FILES.join("` or `")));
    }
    Ok(())
}

/// Copies the model folder `model_dir` into the registry as `name`, with `metadata` (a JSON
/// object; [`REGISTERED_AT`] is added) as its `training_metadata.json`. An existing `name` is
/// replaced only with `force`, in one atomic swap.
pub fn register(
    root: &Path,
    name: &str,
    model_dir: &Path,
    metadata: &serde_json::Value,
    force: bool,
) -> Result<ModelEntry, RegistryError> {
    register_with(root, name, model_dir, &[], metadata, force)
}

/// [`register`], with `extra` files (GGUF exports, …) copied into the model folder beside the
/// model's own, under their file names, in the same atomic swap.
pub fn register_with(
    root: &Path,
    name: &str,
    model_dir: &Path,
    extra: &[PathBuf],
    metadata: &serde_json::Value,
    force: bool,
) -> Result<ModelEntry, RegistryError> {
    let name = validate_name(name)?;
    check_model_folder(model_dir)?;
    let serde_json::Value::Object(fields) = metadata else {
        return Err(RegistryError::MetadataNotObject {
            found: json_kind(metadata),
        });
    };
    let mut fields = fields.clone();
    fields.insert(
        REGISTERED_AT.to_owned(),
        jiff::Timestamp::now().to_string().into(),
    );
    let metadata_json = serde_json::to_string_pretty(&fields).expect("a JSON map serialises");

    let _lock = RegistryLock::acquire(root)?;
    let target = root.join(name);
    if target.exists() && !force {
        return Err(RegistryError::Exists {
            name: name.to_owned(),
            path: target,
        });
    }
    let staging = unique_path(root, STAGING_PREFIX, name);
    let staged = (|| {
        copy_tree(model_dir, &staging, &[METADATA_FILE])?;
        for file in extra {
            let file_name = file.file_name().unwrap_or(file.as_os_str());
            fs::copy(file, staging.join(file_name))?;
            fs::File::open(staging.join(file_name))?.sync_all()?;
        }
        let metadata_path = staging.join(METADATA_FILE);
        fs::write(&metadata_path, metadata_json.as_bytes())?;
        fs::File::open(&metadata_path)?.sync_all()?;
        sync_dir(&staging)
    })();
    if let Err(error) = staged {
        // Best effort: the next writer removes it anyway.
        let _ = fs::remove_dir_all(&staging);
        return Err(error);
    }
    if target.exists() {
        replace_folder(&staging, &target)?;
        // `staging` now holds the old model.
        fs::remove_dir_all(&staging)?;
    } else {
        fs::rename(&staging, &target)?;
    }
    sync_dir(root)?;
    Ok(read_details(name, &target).entry)
}

/// Every registered model, by name. A missing root is an empty registry.
pub fn list(root: &Path) -> Result<Vec<ModelEntry>, RegistryError> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    RegistryLock::tidy(root);
    let mut entries = Vec::new();
    for dir_entry in fs::read_dir(root)? {
        let dir_entry = dir_entry?;
        let name = dir_entry.file_name();
        // Hidden entries (staging, trash, the lock) and stray names are not models.
        let Some(name) = name.to_str().filter(|n| validate_name(n).is_ok()) else {
            continue;
        };
        if dir_entry.path().is_dir() {
            entries.push(read_details(name, &dir_entry.path()).entry);
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// One model with its full metadata.
pub fn show(root: &Path, name: &str) -> Result<ModelDetails, RegistryError> {
    let path = model_path(root, name)?;
    Ok(read_details(name, &path))
}

/// The role in which ragd's config (in `ragd_home`) uses the registered model `name`, if it
/// does: removing that model would break ragd.
pub fn in_use(
    root: &Path,
    name: &str,
    ragd_home: &Path,
) -> Result<Option<ModelRole>, RegistryError> {
    let path = model_path(root, name)?;
    let same = |configured: &Path| {
        let resolved = |p: &Path| fs::canonicalize(p).ok();
        resolved(configured).is_some_and(|c| Some(c) == resolved(&path))
    };
    Ok(super::ragd_config::configured_models(ragd_home)?
        .into_iter()
        .find(|(_, configured)| same(configured))
        .map(|(role, _)| role))
}

/// Removes a model; returns the path it had. Its name disappears in one rename, then the files go.
pub fn remove(root: &Path, name: &str) -> Result<PathBuf, RegistryError> {
    let _lock = RegistryLock::acquire(root)?;
    let path = model_path(root, name)?;
    let trash = unique_path(root, TRASH_PREFIX, name);
    fs::rename(&path, &trash)?;
    sync_dir(root)?;
    fs::remove_dir_all(&trash)?;
    Ok(path)
}

/// Copies a model, metadata included, to `dest`, which must not exist or be an empty folder. The
/// copy is staged beside `dest` and renamed into place, so `dest` is never half written.
pub fn export(root: &Path, name: &str, dest: &Path) -> Result<PathBuf, RegistryError> {
    // Held so that a forced register cannot swap the model in the middle of the copy.
    let _lock = RegistryLock::shared(root)?;
    let source = model_path(root, name)?;
    if dest.exists() {
        let empty = dest.is_dir() && fs::read_dir(dest)?.next().is_none();
        if !empty {
            return Err(RegistryError::DestinationNotEmpty {
                path: dest.to_path_buf(),
            });
        }
    }
    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent)?;
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_owned());
    let staging = unique_path(parent, ".", &format!("{file_name}.export"));
    let copied = copy_tree(&source, &staging, &[]).and_then(|()| {
        if dest.exists() {
            fs::remove_dir(dest)?;
        }
        fs::rename(&staging, dest)?;
        sync_dir(parent)
    });
    if let Err(error) = copied {
        let _ = fs::remove_dir_all(&staging);
        return Err(error);
    }
    Ok(dest.to_path_buf())
}

/// What `models use` changed in ragd's config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UseOutcome {
    /// Each setting written: the model's own, then the reranker registered beside it.
    pub updates: Vec<ConfigUpdate>,
    /// Why the reranker beside the model was not made ragd's, when there is one.
    pub reranker_skipped: Option<String>,
}

/// Makes ragd use the registered model `name` in its role ([`role_of`]). An embedding model
/// whose metadata names a reranker registered beside it ([`RERANKER_KEY`]) brings that reranker
/// along, unless the evaluation found reranking worse than retrieval alone
/// ([`REGRESSION_KEY`] in the reranker's metadata): a reranker never becomes the default then.
pub fn use_registered(
    root: &Path,
    name: &str,
    ragd_home: &Path,
) -> Result<UseOutcome, RegistryError> {
    let path = model_path(root, name)?;
    let role = role_of(&path);
    let mut updates = vec![use_model(root, name, role, ragd_home)?];
    let mut reranker_skipped = None;
    let details = read_details(name, &path);
    if role == ModelRole::Embedding
        && let Some(reranker) = details.metadata[RERANKER_KEY].as_str()
    {
        match model_path(root, reranker) {
            Err(_) => {
                reranker_skipped =
                    Some(format!("its reranker `{reranker}` is no longer registered"));
            }
            Ok(reranker_path) => {
                let reranker_details = read_details(reranker, &reranker_path);
                if reranker_details.metadata[REGRESSION_KEY] == serde_json::Value::Bool(true) {
                    reranker_skipped = Some(format!(
                        "the evaluation found reranking with `{reranker}` worse than retrieval alone"
                    ));
                } else {
                    updates.push(use_model(root, reranker, ModelRole::Reranker, ragd_home)?);
                }
            }
        }
    }
    Ok(UseOutcome {
        updates,
        reranker_skipped,
    })
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::lock::LOCK_NAME;

    /// A tiny sentence-transformers folder whose weights are `size` bytes of `fill`.
    fn model_folder(parent: &Path, fill: u8, size: usize) -> PathBuf {
        let dir = parent.join(format!("model-{fill}"));
        fs::create_dir_all(dir.join("1_Pooling")).expect("mkdir");
        fs::write(dir.join("modules.json"), "[]").expect("modules");
        fs::write(dir.join("config.json"), "{\"hidden_size\": 4}").expect("config");
        fs::write(dir.join("model.safetensors"), vec![fill; size]).expect("weights");
        fs::write(dir.join("1_Pooling/config.json"), "{}").expect("pooling");
        fs::write(dir.join(METADATA_FILE), "{\"stale\": true}").expect("stale metadata");
        dir
    }

    fn metadata() -> serde_json::Value {
        serde_json::json!({
            "recipe": "legal.yaml",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "metrics": {"base": {"ndcg@10": 0.73}, "fine_tuned": {"ndcg@10": 0.81}},
            "tool_version": "0.1.0"
        })
    }

    fn hidden_entries(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(root)
            .expect("read root")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn register_list_show_remove() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        let source = model_folder(dir.path(), 1, 16);
        let before = jiff::Timestamp::now();
        let entry = register(&root, "legal-v2", &source, &metadata(), false).expect("registers");
        assert_eq!(entry.name, "legal-v2");
        assert_eq!(entry.path, root.join("legal-v2"));
        assert_eq!(
            entry.base_model.as_deref(),
            Some("sentence-transformers/all-MiniLM-L6-v2")
        );
        assert_eq!(entry.metrics["fine_tuned.ndcg@10"], 0.81);
        assert!(entry.created.is_some_and(|c| c
            >= before.round(jiff::Unit::Second).expect("rounds")
                - jiff::SignedDuration::from_secs(1)));
        assert_eq!(entry.problem, None);
        for file in [
            "modules.json",
            "config.json",
            "model.safetensors",
            "1_Pooling/config.json",
        ] {
            assert_eq!(
                fs::read(entry.path.join(file)).expect("copied"),
                fs::read(source.join(file)).expect("source"),
                "{file}"
            );
        }

        assert_eq!(list(&root).expect("lists"), vec![entry.clone()]);
        let details = show(&root, "legal-v2").expect("shows");
        assert_eq!(details.entry, entry);
        assert_eq!(details.metadata["recipe"], "legal.yaml");
        assert!(details.metadata["registered_at"].is_string());
        assert!(
            details.metadata.get("stale").is_none(),
            "the caller's metadata replaces the folder's"
        );
        assert_eq!(hidden_entries(&root), vec![".registry.lock"]);

        assert_eq!(remove(&root, "legal-v2").expect("removes"), entry.path);
        assert!(!entry.path.exists());
        assert_eq!(list(&root).expect("lists"), vec![]);
        assert_eq!(hidden_entries(&root), vec![".registry.lock"]);
        assert!(matches!(
            remove(&root, "legal-v2"),
            Err(RegistryError::NotFound { .. })
        ));
    }

    #[test]
    fn a_name_is_never_clobbered_without_force_and_replaced_whole_with_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        register(
            &root,
            "m",
            &model_folder(dir.path(), 1, 8),
            &metadata(),
            false,
        )
        .expect("v1");
        let error = register(
            &root,
            "m",
            &model_folder(dir.path(), 2, 8),
            &metadata(),
            false,
        )
        .expect_err("exists");
        assert!(matches!(error, RegistryError::Exists { .. }), "{error}");
        assert_eq!(
            fs::read(root.join("m/model.safetensors")).expect("v1 kept"),
            vec![1; 8]
        );
        register(
            &root,
            "m",
            &model_folder(dir.path(), 2, 8),
            &metadata(),
            true,
        )
        .expect("v2");
        assert_eq!(
            fs::read(root.join("m/model.safetensors")).expect("v2"),
            vec![2; 8]
        );
        assert_eq!(hidden_entries(&root), vec![".registry.lock"]);
    }

    /// A reader polling the weights while the model is replaced again and again sees one whole
    /// version or the other every time, never a missing or partly written file. Linux only: the
    /// two-rename fallback elsewhere has a moment without the model (the test catches that).
    #[test]
    #[cfg(target_os = "linux")]
    fn readers_never_see_half_a_model_during_forced_replacement() {
        const SIZE: usize = 256 * 1024;
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        let versions = [
            model_folder(dir.path(), 1, SIZE),
            model_folder(dir.path(), 2, SIZE),
        ];
        register(&root, "m", &versions[0], &metadata(), false).expect("v1");
        let weights = root.join("m/model.safetensors");
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut reads = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let bytes = std::fs::read(&weights).expect("the model is always there");
                    assert_eq!(bytes.len(), SIZE);
                    assert!(bytes.iter().all(|&b| b == bytes[0]), "mixed versions");
                    reads += 1;
                }
                reads
            });
            for round in 0..40 {
                register(&root, "m", &versions[round % 2], &metadata(), true).expect("replaces");
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(reader.join().expect("reader finished") > 0);
        });
    }

    #[test]
    fn invalid_names_and_inputs_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        let source = model_folder(dir.path(), 1, 8);
        for name in ["../escape", "..", "a/b", ""] {
            assert!(matches!(
                register(&root, name, &source, &metadata(), true),
                Err(RegistryError::InvalidName { .. })
            ));
            assert!(matches!(
                show(&root, name),
                Err(RegistryError::InvalidName { .. })
            ));
        }
        assert!(!dir.path().join("escape").exists());
        assert!(!root.exists());

        let error = register(&root, "m", &source, &serde_json::json!([1]), false)
            .expect_err("array metadata");
        assert_eq!(
            error.to_string(),
            "training metadata must be a JSON object, not an array"
        );

        fs::remove_file(source.join("model.safetensors")).expect("rm");
        let error = register(&root, "m", &source, &metadata(), false).expect_err("no weights");
        assert!(
            error
                .to_string()
                .ends_with("`model.safetensors` or `pytorch_model.bin` is missing"),
            "{error}"
        );
        fs::remove_file(source.join("modules.json")).expect("rm");
        let error = register(&root, "m", &source, &metadata(), false).expect_err("no modules");
        assert!(
            matches!(&error, RegistryError::NotAModel { missing, .. } if missing == "modules.json"),
            "{error}"
        );
    }

    #[test]
    fn leftovers_of_an_interrupted_writer_are_cleaned_by_the_next_operation() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        register(
            &root,
            "kept",
            &model_folder(dir.path(), 1, 8),
            &metadata(),
            false,
        )
        .expect("m");
        for leftover in [".tmp-half-4242-0", ".trash-old-4242-1"] {
            fs::create_dir_all(root.join(leftover).join("1_Pooling")).expect("mkdir");
            fs::write(root.join(leftover).join("model.safetensors"), [0; 4]).expect("partial");
        }
        let names: Vec<String> = list(&root)
            .expect("lists")
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, vec!["kept"]);
        assert_eq!(hidden_entries(&root), vec![".registry.lock"]);
    }

    #[test]
    fn r18_7_cleanup_touches_only_its_own_leftovers_in_a_registry() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A folder that is not a registry (no lock file), with another tool's hidden folders.
        let downloads = dir.path().join("downloads");
        let foreign = [".tmp-photos", ".trash-old-4242-1", ".tmp-x-1-2"];
        for name in foreign {
            fs::create_dir_all(downloads.join(name)).expect("mkdir");
            fs::write(downloads.join(name).join("keep"), "mine").expect("write");
        }
        assert!(list(&downloads).expect("lists").is_empty());
        assert_eq!(
            hidden_entries(&downloads),
            [".tmp-photos", ".tmp-x-1-2", ".trash-old-4242-1"]
        );
        assert!(
            !downloads.join(LOCK_NAME).exists(),
            "a read created the lock file"
        );
        register(
            &downloads,
            "m",
            &model_folder(dir.path(), 1, 8),
            &metadata(),
            false,
        )
        .expect("registers");
        for name in foreign {
            assert!(
                downloads.join(name).join("keep").is_file(),
                "{name} deleted"
            );
        }

        // In a registry: only names of our own pattern go, and never what a link points at.
        let root = dir.path().join("models");
        register(
            &root,
            "m",
            &model_folder(dir.path(), 2, 8),
            &metadata(),
            false,
        )
        .expect("registers");
        fs::create_dir_all(dir.path().join("elsewhere")).expect("mkdir");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), root.join(".tmp-link-1-2"))
            .expect("link");
        for name in [".tmp-notes", ".trash-", ".tmp-m-12-x", ".tmp-half-4242-0"] {
            fs::create_dir_all(root.join(name)).expect("mkdir");
        }
        list(&root).expect("lists");
        assert_eq!(
            hidden_entries(&root),
            [
                ".registry.lock",
                ".tmp-link-1-2",
                ".tmp-m-12-x",
                ".tmp-notes",
                ".trash-"
            ]
        );
    }

    #[test]
    fn r18_10_links_leaving_the_model_folder_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        let source = model_folder(dir.path(), 1, 8);
        fs::write(dir.path().join("secret"), "key").expect("write");
        // A link inside the folder is copied as the file it names.
        std::os::unix::fs::symlink(source.join("config.json"), source.join("copy.json"))
            .expect("link");
        register(&root, "inside", &source, &metadata(), false).expect("registers");
        assert!(!root.join("inside/copy.json").is_symlink());

        std::os::unix::fs::symlink(dir.path().join("secret"), source.join("1_Pooling/notes"))
            .expect("link");
        let error = register(&root, "m", &source, &metadata(), false).expect_err("refused");
        assert!(
            matches!(&error, RegistryError::LinkOutside { link, .. } if link.ends_with("1_Pooling/notes")),
            "{error}"
        );
        assert!(!root.join("m").exists());
        assert_eq!(hidden_entries(&root), [".registry.lock"]);

        // A registered model edited by hand is refused on export too.
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("inside/secret"))
            .expect("link");
        let dest = dir.path().join("export");
        let error = export(&root, "inside", &dest).expect_err("refused");
        assert!(
            matches!(error, RegistryError::LinkOutside { .. }),
            "{error}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn export_copies_to_a_fresh_or_empty_folder_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        register(
            &root,
            "m",
            &model_folder(dir.path(), 3, 8),
            &metadata(),
            false,
        )
        .expect("m");
        let dest = dir.path().join("out/deep/m");
        assert_eq!(export(&root, "m", &dest).expect("exports"), dest);
        assert_eq!(
            fs::read(dest.join("model.safetensors")).expect("copied"),
            vec![3; 8]
        );
        assert_eq!(
            fs::read(dest.join(METADATA_FILE)).expect("metadata"),
            fs::read(root.join("m").join(METADATA_FILE)).expect("metadata")
        );
        let error = export(&root, "m", &dest).expect_err("not empty");
        assert!(
            matches!(error, RegistryError::DestinationNotEmpty { .. }),
            "{error}"
        );
        let empty = dir.path().join("empty");
        fs::create_dir(&empty).expect("mkdir");
        export(&root, "m", &empty).expect("an empty folder is fine");
        assert!(empty.join("1_Pooling/config.json").is_file());
        let file = dir.path().join("file");
        fs::write(&file, "x").expect("write");
        assert!(matches!(
            export(&root, "m", &file),
            Err(RegistryError::DestinationNotEmpty { .. })
        ));
        assert!(matches!(
            export(&root, "nope", &dir.path().join("x")),
            Err(RegistryError::NotFound { .. })
        ));
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("out/deep"))
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, vec!["m"]);
    }

    #[test]
    fn the_default_root_follows_ragd_home_then_home() {
        let home = Some(PathBuf::from("/home/ana"));
        assert_eq!(
            ragd_home_from(Some("/srv/ragd".into()), home.clone()).expect("set"),
            PathBuf::from("/srv/ragd")
        );
        assert_eq!(
            ragd_home_from(Some("".into()), home.clone()).expect("empty is unset"),
            PathBuf::from("/home/ana/.ragd")
        );
        assert_eq!(
            ragd_home_from(None, home).expect("home"),
            PathBuf::from("/home/ana/.ragd")
        );
        assert!(matches!(
            ragd_home_from(None, None),
            Err(RegistryError::NoHome)
        ));
    }

    #[test]
    fn r18_9_use_writes_through_a_linked_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        register(
            &root,
            "m",
            &model_folder(dir.path(), 1, 8),
            &metadata(),
            false,
        )
        .expect("m");
        let ragd_home = dir.path().join("ragd");
        let dotfiles = dir.path().join("dotfiles");
        fs::create_dir_all(&ragd_home).expect("mkdir");
        fs::create_dir_all(&dotfiles).expect("mkdir");
        fs::write(dotfiles.join("ragd.yaml"), "embedding:\n  model: minilm\n").expect("write");
        // A relative link, as dotfile managers make them.
        std::os::unix::fs::symlink("../dotfiles/ragd.yaml", ragd_home.join("config.yaml"))
            .expect("link");

        let update = use_model(&root, "m", ModelRole::Embedding, &ragd_home).expect("edits");
        assert!(
            update.config_path.is_symlink(),
            "the link was replaced by a file"
        );
        let target = fs::read_to_string(dotfiles.join("ragd.yaml")).expect("read");
        assert!(target.contains("model: custom"), "{target}");
        assert!(
            fs::read_dir(&ragd_home).expect("read").count() == 1,
            "a temporary file was left beside the link"
        );
    }

    #[test]
    fn use_model_edits_ragd_config_keeping_comments_and_permissions() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("my models");
        register(
            &root,
            "m",
            &model_folder(dir.path(), 1, 8),
            &metadata(),
            false,
        )
        .expect("m");
        let ragd_home = dir.path().join("ragd");

        let update =
            use_model(&root, "m", ModelRole::Embedding, &ragd_home).expect("creates the config");
        assert!(update.created);
        assert_eq!(update.model_path, root.join("m"));
        assert!(update.model_path.is_absolute());
        let config = fs::read_to_string(&update.config_path).expect("written");
        assert_eq!(
            config,
            format!(
                "embedding:\n  model: custom\n  custom_model_path: \"{}\"\n",
                root.join("m").display()
            )
        );

        let original =
            "# ragd\napi_key: s3cret  # keep private\nembedding:\n  model: minilm # was\n";
        fs::write(&update.config_path, original).expect("write");
        fs::set_permissions(&update.config_path, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let update = use_model(&root, "m", ModelRole::Embedding, &ragd_home).expect("edits");
        assert!(!update.created);
        let config = fs::read_to_string(&update.config_path).expect("written");
        assert!(
            config.starts_with(
                "# ragd\napi_key: s3cret  # keep private\nembedding:\n  model: custom # was\n"
            ),
            "{config}"
        );
        let mode = fs::metadata(&update.config_path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let tmp: Vec<_> = fs::read_dir(&ragd_home)
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(tmp, vec!["config.yaml"]);

        fs::write(&update.config_path, "embedding: {model: x}\n").expect("write");
        let error =
            use_model(&root, "m", ModelRole::Embedding, &ragd_home).expect_err("flow style");
        assert!(
            matches!(error, RegistryError::ConfigFlowStyle { line: 1, .. }),
            "{error}"
        );
        assert_eq!(
            fs::read_to_string(&update.config_path).expect("untouched"),
            "embedding: {model: x}\n"
        );
        assert!(matches!(
            use_model(&root, "missing", ModelRole::Embedding, &ragd_home),
            Err(RegistryError::NotFound { .. })
        ));
    }

    /// A cross-encoder folder (no `modules.json`) registers as a reranker; `models use` on the
    /// embedding model that names it writes both settings, and leaves the reranker out once its
    /// evaluation found reranking worse.
    #[test]
    fn a_reranker_beside_a_model_is_used_unless_it_was_found_worse() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("models");
        let reranker = dir.path().join("ce");
        fs::create_dir_all(&reranker).expect("mkdir");
        fs::write(
            reranker.join("config.json"),
            r#"{"architectures": ["BertForSequenceClassification"], "num_labels": 1}"#,
        )
        .expect("config");
        fs::write(reranker.join("model.safetensors"), [0u8; 8]).expect("weights");
        assert_eq!(role_of(&reranker), ModelRole::Reranker);
        assert_eq!(
            role_of(&model_folder(dir.path(), 1, 8)),
            ModelRole::Embedding
        );
        let mut reranker_meta = metadata();
        reranker_meta[REGRESSION_KEY] = false.into();
        register(&root, "m-reranker", &reranker, &reranker_meta, false).expect("registers");
        let mut model_meta = metadata();
        model_meta[RERANKER_KEY] = "m-reranker".into();
        register(
            &root,
            "m",
            &model_folder(dir.path(), 1, 8),
            &model_meta,
            false,
        )
        .expect("m");

        let home = dir.path().join("ragd");
        let outcome = use_registered(&root, "m", &home).expect("uses");
        assert_eq!(outcome.reranker_skipped, None);
        let roles: Vec<ModelRole> = outcome.updates.iter().map(|u| u.role).collect();
        assert_eq!(roles, [ModelRole::Embedding, ModelRole::Reranker]);
        let config: serde_yaml::Value =
            serde_yaml::from_str(&fs::read_to_string(home.join("config.yaml")).expect("config"))
                .expect("yaml");
        assert_eq!(config["retrieval"]["rerank"], serde_yaml::Value::Bool(true));
        assert_eq!(
            config["retrieval"]["rerank_model"].as_str(),
            root.join("m-reranker").to_str()
        );

        // Found worse: the embedding model is still used, the reranker is not.
        reranker_meta[REGRESSION_KEY] = true.into();
        register(&root, "m-reranker", &reranker, &reranker_meta, true).expect("replaces");
        let home = dir.path().join("ragd-2");
        let outcome = use_registered(&root, "m", &home).expect("uses");
        assert_eq!(outcome.updates.len(), 1);
        assert!(
            outcome
                .reranker_skipped
                .as_deref()
                .is_some_and(|why| why.contains("worse")),
            "{outcome:?}"
        );
        let config = fs::read_to_string(home.join("config.yaml")).expect("config");
        assert!(!config.contains("rerank"), "{config}");

        // Named directly, a reranker fills the reranker setting only.
        let outcome = use_registered(&root, "m-reranker", &home).expect("uses");
        assert_eq!(outcome.updates[0].role, ModelRole::Reranker);
    }
}
