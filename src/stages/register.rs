//! The register stage: copies the fine-tuned model into the model registry (where ragd,
//! sentence-transformers and `ragd-pipe models` find it) with its provenance, and optionally makes
//! it ragd's embedding model. A reranker the recipe trained is registered beside it as
//! `<name>-reranker`, named in the model's metadata, and made ragd's reranker with it.
//!
//! Its work lies outside the store, so its artifact (`registered.json`) records where the models
//! went, and [`Stage::effect_missing`] reruns the stage when a folder or GGUF file is gone. The
//! regression guard lives here: a model the evaluation found worse than its base, or a reranker
//! that made retrieval worse, is registered, but never made the default unless `allow_worse` says
//! so; and a model is made the default only when the evaluation's verdict is `better` (or, with
//! `default_when: not_worse`, `no clear difference`).
//!
//! The registered folder also holds the model as GGUF files (`<name>-f16.gguf`, … for
//! llama.cpp and Ollama; `register.gguf`). With `register.ollama`, the model is created in an
//! Ollama server and the stage succeeds only when what the server serves embeds the probe texts
//! like our own encoder (cosine ≥ `min_cosine` for each).

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::io;
use super::io::MODEL_DIR;
use super::io::REPORT_FILE;
use super::io::RERANKER_DIR;
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome,
};
use crate::eval::Report;
use crate::eval::report::{VERDICT_BETTER, VERDICT_WORSE};
use crate::model::gguf::{self, GgufType};
use crate::model::ollama::{OllamaServer, ServedCheck};
use crate::registry::{self, METADATA_FILE, ModelRole, RegistryError};

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
    /// `embedding.custom_model_path` in ragd's `config.yaml`, keeping everything else; and, when
    /// the recipe trains a reranker, `retrieval.rerank: true` and `retrieval.rerank_model`.
    #[serde(default)]
    pub make_default: bool,
    /// Make them the default even when the evaluation found the model worse than the base model,
    /// or reranking worse than retrieval alone.
    #[serde(default)]
    pub allow_worse: bool,
    /// Which verdict of the evaluation makes the model the default: `better` (only a model
    /// better than its base beyond noise) or `not_worse` (also on `no clear difference`).
    /// `allow_worse: true` makes it the default whatever the verdict.
    #[serde(default)]
    pub default_when: DefaultWhen,
    /// GGUF files to write beside the model, for llama.cpp and Ollama: `<name>-<type>.gguf` for
    /// each of `f16`, `q8_0`, `f32`; `[]` writes none.
    #[serde(default = "default_gguf")]
    pub gguf: Vec<GgufType>,
    /// Serve the model from an Ollama server too, and check what it serves.
    #[serde(default)]
    pub ollama: Option<OllamaParams>,
}

/// The verdicts on which `make_default` makes the model ragd's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DefaultWhen {
    /// Only `better`.
    #[default]
    Better,
    /// `better` or `no clear difference`.
    NotWorse,
}

impl DefaultWhen {
    /// Whether `verdict`, a [`crate::eval::report::Verdict`] label, allows it.
    fn allows(self, verdict: &str) -> bool {
        match self {
            Self::Better => verdict == VERDICT_BETTER,
            Self::NotWorse => verdict != VERDICT_WORSE,
        }
    }
}

fn default_gguf() -> Vec<GgufType> {
    vec![GgufType::F16]
}

/// The `register.ollama:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct OllamaParams {
    /// The model's name in Ollama (`name` or `name:tag`); replaced if it exists.
    pub name: String,
    /// The server; default: `OLLAMA_HOST`, else `http://127.0.0.1:11434`.
    #[serde(default)]
    pub url: Option<String>,
    /// Which GGUF the server gets.
    #[serde(default)]
    pub gguf: GgufType,
    /// The least cosine similarity, for every probe text, between the server's embedding and
    /// ours; below it the stage fails.
    #[serde(default = "default_min_cosine")]
    pub min_cosine: f64,
}

fn default_min_cosine() -> f64 {
    0.99
}

/// Where a run registered its model: `registered.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Registered {
    name: String,
    path: PathBuf,
    made_default: bool,
    #[serde(default)]
    gguf: Vec<PathBuf>,
    #[serde(default)]
    ollama: Option<ServedCheck>,
    /// The reranker registered beside the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reranker: Option<Box<Registered>>,
}

/// The registry name of the reranker registered beside the model `name`.
fn reranker_name(name: &str) -> String {
    format!("{name}-reranker")
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
        let reranker = reranker_name(&name);
        if let Err(error) =
            registry::validate_name(&name).and_then(|_| registry::validate_name(&reranker))
        {
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
    /// 3: the model becomes the default only on the verdict `default_when` names.
    fn version(&self) -> u32 {
        3
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
            Input {
                artifact: Artifact::Reranker,
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
                    .map_err(StageError::engine)?,
            ),
            Err(_) => None,
        };
        let recipe_path = std::path::absolute(&ctx.recipe_path)?;
        let force = self.params.force || self.registered_by(&root, &recipe_path);
        let reranker = match ctx.input(Artifact::Reranker) {
            Ok(artifact) => {
                let dir = artifact.join(RERANKER_DIR);
                let name = reranker_name(&self.name);
                let mut metadata = self.metadata(ctx, &dir, &recipe_path, report.as_ref())?;
                metadata[registry::REGRESSION_KEY] =
                    report.as_ref().map(|r| r.reranker_regression).into();
                // The verdict judges the bi-encoder; the reranker has only its regression flag.
                if let Some(fields) = metadata.as_object_mut() {
                    fields.remove("verdict");
                }
                let entry = self.register_folder(&root, &name, &dir, &[], &metadata, force)?;
                ctx.info(format!(
                    "registered the reranker `{name}` in `{}`",
                    entry.path.display()
                ));
                Some(Registered {
                    name,
                    path: std::path::absolute(&entry.path)?,
                    made_default: false,
                    gguf: Vec::new(),
                    ollama: None,
                    reranker: None,
                })
            }
            Err(_) => None,
        };
        let mut metadata = self.metadata(ctx, &model_dir, &recipe_path, report.as_ref())?;
        if let Some(reranker) = &reranker {
            metadata[registry::RERANKER_KEY] = reranker.name.clone().into();
        }
        let staging = ctx.out_dir.join(".gguf");
        let ggufs = self.write_ggufs(ctx, &model_dir, &staging)?;
        // The evaluation's report travels with the model, so its verdict is never far from it.
        let mut extra = ggufs.clone();
        if let Ok(dir) = ctx.input(Artifact::Evaluation)
            && dir.join(REPORT_HTML).is_file()
        {
            extra.push(dir.join(REPORT_HTML));
        }
        let registered =
            self.register_folder(&root, &self.name, &model_dir, &extra, &metadata, force);
        if staging.exists() {
            fs_err::remove_dir_all(&staging)?;
        }
        let entry = registered?;
        ctx.info(format!(
            "registered `{}` in `{}`",
            self.name,
            entry.path.display()
        ));

        let mut registered = Registered {
            name: self.name.clone(),
            path: std::path::absolute(&entry.path)?,
            made_default: false,
            gguf: ggufs
                .iter()
                .filter_map(|g| g.file_name().map(|n| entry.path.join(n)))
                .collect(),
            ollama: None,
            reranker: reranker.map(Box::new),
        };
        if self.params.make_default {
            self.make_default(ctx, &root, &mut registered, report.as_ref())?;
        }
        if let Some(params) = &self.params.ollama {
            registered.ollama = Some(self.serve(ctx, params, &entry.path)?);
        }
        io::write_json(&ctx.out_dir.join(REGISTERED_FILE), &registered)?;
        Ok(StageOutcome {
            summary: serde_json::to_value(&registered)?,
        })
    }

    fn effect_missing(&self, artifact: &Path) -> Option<String> {
        let text = fs_err::read_to_string(artifact.join(REGISTERED_FILE)).ok()?;
        let registered: Registered = serde_json::from_str(&text).ok()?;
        std::iter::once(&registered)
            .chain(registered.reranker.as_deref())
            .find(|r| !r.path.join(METADATA_FILE).is_file())
            .map(|missing| {
                format!(
                    "the registered model `{}` is no longer in `{}`",
                    missing.name,
                    missing.path.display()
                )
            })
            .or_else(|| {
                registered
                    .gguf
                    .iter()
                    .find(|file| !file.is_file())
                    .map(|file| format!("the GGUF file `{}` is gone", file.display()))
            })
    }
}

impl Register {
    fn register_folder(
        &self,
        root: &Path,
        name: &str,
        dir: &Path,
        extra: &[PathBuf],
        metadata: &serde_json::Value,
        force: bool,
    ) -> Result<registry::ModelEntry, StageError> {
        registry::register_with(root, name, dir, extra, metadata, force).map_err(|error| match error {
            RegistryError::Exists { .. } => StageError::Failed(format!(
                "{error}; another recipe registered it: set `register.force: true` to replace it, or choose another `register.name`"
            )),
            other => registry_error(other),
        })
    }

    /// Points ragd at the model and its reranker, each unless the evaluation found it worse
    /// (and `allow_worse` is off).
    fn make_default(
        &self,
        ctx: &StageContext,
        root: &Path,
        registered: &mut Registered,
        report: Option<&Report>,
    ) -> Result<(), StageError> {
        let home = registry::default_ragd_home().map_err(registry_error)?;
        let allow = self.params.allow_worse;
        let verdict = report.and_then(|r| r.verdict.as_ref());
        if report.is_some_and(|r| r.regression) && !allow {
            ctx.warn(format!(
                "NOT making `{}` ragd's default: the evaluation found it worse than the base model. Set `register.allow_worse: true` to do it anyway.",
                self.name
            ));
        } else if let Some(verdict) =
            verdict.filter(|v| !allow && !self.params.default_when.allows(&v.label))
        {
            ctx.warn(format!(
                "NOT making `{}` ragd's default: the verdict is `{}`. {} Set `register.default_when: not_worse` or `register.allow_worse: true` to do it anyway.",
                self.name, verdict.label, verdict.why
            ));
        } else {
            let update = registry::use_model(root, &self.name, ModelRole::Embedding, &home)
                .map_err(registry_error)?;
            registered.made_default = true;
            ctx.info(format!(
                "ragd now embeds with `{}` (`{}`)",
                self.name,
                update.config_path.display()
            ));
        }
        if let Some(reranker) = registered.reranker.as_deref_mut() {
            if report.is_some_and(|r| r.reranker_regression) && !allow {
                ctx.warn(format!(
                    "NOT making `{}` ragd's reranker: the evaluation found reranking worse than retrieval alone. Set `register.allow_worse: true` to do it anyway.",
                    reranker.name
                ));
            } else {
                let update = registry::use_model(root, &reranker.name, ModelRole::Reranker, &home)
                    .map_err(registry_error)?;
                reranker.made_default = true;
                ctx.info(format!(
                    "ragd now reranks with `{}` (`{}`)",
                    reranker.name,
                    update.config_path.display()
                ));
            }
        }
        Ok(())
    }

    fn root(&self) -> Result<PathBuf, StageError> {
        match &self.registry {
            Some(dir) => Ok(dir.clone()),
            None => registry::default_root().map_err(registry_error),
        }
    }

    /// The GGUF types to write: `register.gguf`, plus the one Ollama gets.
    fn gguf_types(&self) -> Vec<GgufType> {
        let mut types = self.params.gguf.clone();
        if let Some(ollama) = &self.params.ollama
            && !types.contains(&ollama.gguf)
        {
            types.push(ollama.gguf);
        }
        types
    }

    fn gguf_file_name(&self, gguf_type: GgufType) -> String {
        format!("{}-{gguf_type}.gguf", self.name)
    }

    /// Exports the model in each GGUF type into `staging`, for the registry to copy in.
    fn write_ggufs(
        &self,
        ctx: &StageContext,
        model_dir: &Path,
        staging: &Path,
    ) -> Result<Vec<PathBuf>, StageError> {
        let mut files = Vec::new();
        if let Some(why) = gguf::not_exportable(model_dir).map_err(StageError::engine)? {
            // Ollama serves GGUF files only: a block asking for it cannot be met.
            if self.params.ollama.is_some() {
                return Err(StageError::Failed(format!(
                    "`register.ollama` needs a GGUF file, and this model cannot be one: {why}"
                )));
            }
            ctx.warn(format!(
                "no GGUF written ({why}); the sentence-transformers folder is registered, for ragd and sentence-transformers"
            ));
            return Ok(files);
        }
        for gguf_type in self.gguf_types() {
            let path = staging.join(self.gguf_file_name(gguf_type));
            let exported = gguf::export_bert(model_dir, &path, gguf_type, &self.name)
                .map_err(StageError::engine)?;
            ctx.info(format!(
                "wrote the {gguf_type} GGUF ({:.1} MB, {} tensors, {} pooling)",
                exported.bytes as f64 / 1e6,
                exported.tensors,
                exported.pooling
            ));
            files.push(path);
        }
        Ok(files)
    }

    /// Creates the model in Ollama from its GGUF and checks, probe text by probe text, that the
    /// server embeds like our encoder.
    fn serve(
        &self,
        ctx: &StageContext,
        params: &OllamaParams,
        registered: &Path,
    ) -> Result<ServedCheck, StageError> {
        let server = match &params.url {
            Some(url) => OllamaServer::new(url),
            None => OllamaServer::from_env(),
        }
        .map_err(StageError::engine)?;
        let gguf = registered.join(self.gguf_file_name(params.gguf));
        let check = server
            .publish(&params.name, &gguf, registered)
            .map_err(StageError::engine)?;
        ctx.info(format!(
            "Ollama at {} serves `{}` ({}); cosine with our encoder, per probe text:",
            check.url, params.name, params.gguf
        ));
        for probe in &check.probes {
            ctx.info(format!("  {:.6}  {}", probe.cosine, probe.text));
        }
        let passed = check.min_cosine >= params.min_cosine;
        ctx.info(format!(
            "probe comparison: min {:.6}, mean {:.6} over {} texts (needs >= {}): {}",
            check.min_cosine,
            check.mean_cosine,
            check.probes.len(),
            params.min_cosine,
            if passed { "ok" } else { "FAILED" }
        ));
        if !passed {
            let worst = check
                .probes
                .iter()
                .find(|p| p.cosine.is_nan() || p.cosine < params.min_cosine)
                .map_or(String::new(), |p| {
                    format!(" (`{}`: {:.6})", p.text, p.cosine)
                });
            return Err(StageError::Failed(format!(
                "the model Ollama serves as `{}` does not embed like ours: cosine below {}{worst}",
                params.name, params.min_cosine
            )));
        }
        Ok(check)
    }

    /// Whether the model of this name came from this same recipe file, which may replace it.
    fn registered_by(&self, root: &Path, recipe_path: &Path) -> bool {
        registry::show(root, &self.name).is_ok_and(|details| {
            let recipe = &details.metadata["recipe"];
            recipe["origin"].as_str() == Some(recipe_origin(recipe_path).as_str())
                // Models registered before `origin` kept the path itself.
                || recipe["path"].as_str() == recipe_path.to_str()
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
                    "file": recipe_path.file_name().map(|n| n.to_string_lossy()),
                    "origin": recipe_origin(recipe_path),
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
            // What `models list` shows in its verdict column.
            (
                "verdict",
                report
                    .and_then(|r| r.verdict.as_ref())
                    .and_then(|v| serde_json::to_value(v).ok())
                    .unwrap_or_default(),
            ),
        ];
        for (key, value) in fields {
            metadata[key] = value;
        }
        Ok(metadata)
    }
}

/// Which recipe file registered a model, without the path: a model folder is copied and shared,
/// and a path names the user's home and folders.
fn recipe_origin(recipe_path: &Path) -> String {
    crate::cache::digest::hash_bytes(recipe_path.to_string_lossy().as_bytes())
}

/// The evaluation's HTML report, copied into the registered model's folder.
const REPORT_HTML: &str = "report.html";

fn registry_error(error: RegistryError) -> StageError {
    StageError::engine(error)
}
