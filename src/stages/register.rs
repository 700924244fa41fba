//! The register stage: copies the fine-tuned model into the model registry (where ragd,
//! sentence-transformers and `ragd-pipe models` find it) with its provenance, and optionally makes
//! it ragd's embedding model.
//!
//! Its work lies outside the store, so its artifact (`registered.json`) records where the model
//! went, and [`Stage::effect_missing`] reruns the stage when that folder is gone. The regression
//! guard lives here: a model the evaluation found worse than its base is registered, but never
//! made the default unless `allow_worse` says so.

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::evaluate::REPORT_FILE;
use super::io;
use super::train::MODEL_DIR;
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome,
};
use crate::eval::Report;
use crate::registry::{self, METADATA_FILE, RegistryError};

/// What register leaves in the store.
const REGISTERED_FILE: &str = "registered.json";

/// The `register:` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RegisterParams {
    /// The model's name in the registry; default: the recipe's `name`.
    #[serde(default)]
    pub name: Option<String>,
    /// The registry folder; default: `$RAGD_HOME/models`, else `~/.ragd/models`.
    #[serde(default)]
    pub registry: Option<PathBuf>,
    /// Replace a model of the same name that another recipe registered. A model this recipe
    /// registered before is always replaced.
    #[serde(default)]
    pub force: bool,
    /// Make ragd embed with this model: sets `embedding.model: custom` and
    /// `embedding.custom_model_path` in ragd's `config.yaml`, keeping everything else.
    #[serde(default)]
    pub make_default: bool,
    /// Make it the default even when the evaluation found it worse than the base model.
    #[serde(default)]
    pub allow_worse: bool,
}

/// Where a run registered its model: `registered.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Registered {
    name: String,
    path: PathBuf,
    made_default: bool,
}

pub struct Register {
    params: RegisterParams,
    name: String,
    /// The registry folder resolved against the recipe, when the recipe names one.
    registry: Option<PathBuf>,
    base_model: String,
}

impl StageDef for Register {
    const KIND: &'static str = "register";
    const SECTION: &'static str = "register";
    const ABOUT: &'static str = "Store the fine-tuned model with its provenance in the model registry, optionally as ragd's default.";
    const PRODUCES: Artifact = Artifact::Registration;
    type Params = RegisterParams;

    fn new(params: RegisterParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let name = params.name.clone().unwrap_or_else(|| env.name.clone());
        if let Err(error) = registry::validate_name(&name) {
            let invalid = if params.name.is_some() {
                Invalid::new(&["name"], error.to_string())
            } else {
                Invalid::new(
                    &[],
                    format!("the recipe's name cannot name a model: {error}"),
                )
            };
            return Err(vec![
                invalid.with_help("set `register.name` to a plain name"),
            ]);
        }
        Ok(Self {
            registry: params.registry.as_ref().map(|dir| env.dir.join(dir)),
            params,
            name,
            base_model: env.base_model.clone(),
        })
    }
}

impl Stage for Register {
    fn kind(&self) -> &'static str {
        Self::KIND
    }

    fn version(&self) -> u32 {
        1
    }

    fn inputs(&self) -> Vec<Input> {
        vec![
            Input {
                artifact: Artifact::Model,
                required: true,
                instead: None,
            },
            Input {
                artifact: Artifact::Evaluation,
                required: false,
                instead: None,
            },
        ]
    }

    fn params(&self) -> serde_json::Value {
        let mut params = serde_json::to_value(&self.params).unwrap_or_default();
        params["name"] = self.name.clone().into();
        params
    }

    fn externals(&self, _env: &StageEnv) -> Result<Vec<External>, StageError> {
        Ok(Vec::new())
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let root = self.root()?;
        let model_dir = ctx.input(Artifact::Model)?.join(MODEL_DIR);
        let report = match ctx.input(Artifact::Evaluation) {
            Ok(dir) => Some(
                Report::from_json(&fs_err::read_to_string(dir.join(REPORT_FILE))?)
                    .map_err(|e| StageError::Failed(super::error::error_chain(&e)))?,
            ),
            Err(_) => None,
        };
        let recipe_path = std::path::absolute(&ctx.recipe_path)?;
        let force = self.params.force || self.registered_by(&root, &recipe_path);
        let metadata = self.metadata(ctx, &model_dir, &recipe_path, report.as_ref())?;
        let entry = registry::register(&root, &self.name, &model_dir, &metadata, force).map_err(
            |error| match error {
                RegistryError::Exists { .. } => StageError::Failed(format!(
                    "{error}; another recipe registered it: set `register.force: true` to replace it, or choose another `register.name`"
                )),
                other => registry_error(other),
            },
        )?;
        ctx.info(format!(
            "registered `{}` in `{}`",
            self.name,
            entry.path.display()
        ));

        let mut made_default = false;
        if self.params.make_default {
            let worse = report.as_ref().is_some_and(|r| r.regression);
            if worse && !self.params.allow_worse {
                ctx.warn(format!(
                    "NOT making `{}` ragd's default: the evaluation found it worse than the base model. Set `register.allow_worse: true` to do it anyway.",
                    self.name
                ));
            } else {
                let home = registry::default_ragd_home().map_err(registry_error)?;
                let update =
                    registry::use_model(&root, &self.name, &home).map_err(registry_error)?;
                made_default = true;
                ctx.info(format!(
                    "ragd now embeds with `{}` (`{}`)",
                    self.name,
                    update.config_path.display()
                ));
            }
        }
        let registered = Registered {
            name: self.name.clone(),
            path: std::path::absolute(&entry.path)?,
            made_default,
        };
        io::write_json(&ctx.out_dir.join(REGISTERED_FILE), &registered)?;
        Ok(StageOutcome {
            summary: serde_json::to_value(&registered)?,
        })
    }

    fn effect_missing(&self, artifact: &Path) -> Option<String> {
        let text = fs_err::read_to_string(artifact.join(REGISTERED_FILE)).ok()?;
        let registered: Registered = serde_json::from_str(&text).ok()?;
        (!registered.path.join(METADATA_FILE).is_file()).then(|| {
            format!(
                "the registered model `{}` is no longer in `{}`",
                registered.name,
                registered.path.display()
            )
        })
    }
}

impl Register {
    fn root(&self) -> Result<PathBuf, StageError> {
        match &self.registry {
            Some(dir) => Ok(dir.clone()),
            None => registry::default_root().map_err(registry_error),
        }
    }

    /// Whether the model of this name came from this same recipe file, which may replace it.
    fn registered_by(&self, root: &Path, recipe_path: &Path) -> bool {
        registry::show(root, &self.name).is_ok_and(|details| {
            details.metadata["recipe"]["path"].as_str() == recipe_path.to_str()
        })
    }

    /// `training_metadata.json` of the registered model: the trainer's own metadata, plus the
    /// recipe, the cache keys of everything upstream, and the evaluation's headline metrics.
    fn metadata(
        &self,
        ctx: &StageContext,
        model_dir: &Path,
        recipe_path: &Path,
        report: Option<&Report>,
    ) -> Result<serde_json::Value, StageError> {
        let mut metadata = match fs_err::read_to_string(model_dir.join(METADATA_FILE)) {
            Ok(text) => serde_json::from_str(&text)?,
            Err(_) => serde_json::json!({}),
        };
        if !metadata.is_object() {
            metadata = serde_json::json!({ "training": metadata });
        }
        let fields = [
            (
                "base_model",
                metadata
                    .get("base_model")
                    .cloned()
                    .unwrap_or_else(|| self.base_model.clone().into()),
            ),
            (
                "recipe",
                serde_json::json!({
                    "path": recipe_path,
                    "text": ctx.recipe_text,
                    "stage_keys": ctx.upstream_keys,
                }),
            ),
            ("tool_version", env!("CARGO_PKG_VERSION").into()),
            (
                "metrics",
                report
                    .map(Report::headline_means)
                    .unwrap_or_default()
                    .into(),
            ),
            ("evaluation_regression", report.map(|r| r.regression).into()),
        ];
        for (key, value) in fields {
            metadata[key] = value;
        }
        Ok(metadata)
    }
}

fn registry_error(error: RegistryError) -> StageError {
    StageError::Failed(super::error::error_chain(&error))
}
