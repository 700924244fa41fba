//! Stages: one file per stage kind behind the [`Stage`] trait, and the one [`REGISTRY`] that the
//! recipe loader, the planner, the schema and `ragd-pipe stages` read. Adding a stage is one file
//! plus one line in `REGISTRY`; the executor never names a stage.
//!
//! A stage never touches the terminal: it reports through [`StageContext`] (progress, notes,
//! tables), writes its artifact into `ctx.out_dir`, and may keep a journal in `ctx.journal_dir`,
//! which survives an interrupted run of the same cache key so a long stage resumes.

pub mod chunk;
pub mod context;
pub mod error;
pub mod estimate;
pub mod evaluate;
pub mod io;
pub mod judge;
pub mod llm_calls;
pub mod mine;
pub mod query_gen;
pub mod register;
pub mod train;
pub mod train_reranker;

use std::path::PathBuf;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use context::{Progress, StageContext, StageEnv, StageNote, StageReporter, Table};
pub use error::StageError;

use crate::model::device::Accelerator;
use crate::model::encoder::EncodePrecision;

/// What a stage hands downstream. A consumer's input resolves to the nearest stage before it (in
/// registry order, the canonical chain) that produces the artifact, unless its section lists the
/// stages to read with `from:`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Artifact {
    /// `chunks.jsonl`: the corpus cut into chunks.
    Chunks,
    /// `queries.jsonl`: synthetic queries, each tied to its chunk.
    Queries,
    /// `train.jsonl` and `heldout.jsonl`: training examples with hard negatives.
    TrainingData,
    /// `model/`: a sentence-transformers model folder.
    Model,
    /// `reranker/`: a cross-encoder folder (sentence-transformers' `CrossEncoder`).
    Reranker,
    /// `report.json` and friends: base against fine-tuned.
    Evaluation,
    /// `registered.json`: where the model was registered.
    Registration,
}

impl Artifact {
    pub fn name(self) -> &'static str {
        match self {
            Self::Chunks => "chunks",
            Self::Queries => "queries",
            Self::TrainingData => "training data",
            Self::Model => "model",
            Self::Reranker => "reranker",
            Self::Evaluation => "evaluation",
            Self::Registration => "registration",
        }
    }
}

/// One artifact a stage reads from upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub artifact: Artifact,
    /// An optional input is used when some stage of the recipe produces it.
    pub required: bool,
    /// The recipe key that supplies this input from outside the pipeline instead (e.g. `data` for
    /// train), named in the error when neither that key nor a producing stage is there.
    pub instead: Option<&'static str>,
}

/// Something outside the store that a stage reads, hashed into its cache key.
#[derive(Debug, Clone)]
pub enum External {
    /// Files whose bytes the stage reads (a corpus, a data file). `root` makes paths relative in
    /// the lock so a recipe and its lock move together.
    Files {
        label: String,
        root: PathBuf,
        files: Vec<PathBuf>,
    },
    /// A model folder or file, hashed by its files' bytes.
    Model {
        label: String,
        reference: String,
        path: PathBuf,
    },
    /// Something identified remotely, such as an Ollama model digest.
    Identity { label: String, value: String },
}

impl External {
    /// The sentence-embedding model `reference` (the recipe's base model) as an input: its
    /// folder's files enter the key.
    pub fn base_model(env: &StageEnv, reference: &str) -> Result<Self, StageError> {
        Self::model(env, "base_model", reference)
    }

    /// The recipe's `encode_precision` as an input of a stage that encodes texts with the
    /// recipe's models; none at f32, so f32 recipes keep the keys they had before the option.
    pub fn encode_precision(env: &StageEnv) -> Option<Self> {
        let precision = env.recipe.encode_precision;
        (precision != EncodePrecision::F32).then(|| Self::Identity {
            label: "encode_precision".to_owned(),
            value: precision.name().to_owned(),
        })
    }

    /// The sentence-transformers folder (an encoder or a cross-encoder) `reference` as an input
    /// named `label` in the key.
    pub fn model(env: &StageEnv, label: &str, reference: &str) -> Result<Self, StageError> {
        let path = env.resolve_model(reference, crate::model::hub::SENTENCE_TRANSFORMER_FILES)?;
        Ok(Self::Model {
            label: label.to_owned(),
            reference: reference.to_owned(),
            path,
        })
    }
}

/// What a stage returns: a summary stored in the lock and its run record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageOutcome {
    /// Counts and figures, stored as the stage's summary.
    pub summary: serde_json::Value,
}

/// A bad value in a section, found when the section is built. `path` is relative to the section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub path: Vec<String>,
    pub message: String,
    pub help: Option<String>,
}

impl Invalid {
    pub fn new(path: &[&str], message: impl Into<String>) -> Self {
        Self {
            path: path.iter().map(|p| (*p).to_owned()).collect(),
            message: message.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// What every stage can see of the recipe while it is being built.
#[derive(Debug, Clone)]
pub struct RecipeEnv {
    /// The recipe's folder: relative paths in the recipe resolve against it.
    pub dir: PathBuf,
    pub name: String,
    /// The recipe's `base_model` reference, as written.
    pub base_model: String,
    pub seed: u64,
    pub accelerator: Accelerator,
    pub encode_precision: EncodePrecision,
}

/// A stage of the pipeline. Object-safe: the executor holds `Box<dyn Stage>` only.
pub trait Stage: Send + Sync {
    /// Bumped whenever the implementation changes what it produces for the same inputs.
    fn version(&self) -> u32;
    /// Artifacts read from upstream stages, given the parameters.
    fn inputs(&self) -> Vec<Input>;
    /// Canonical parameters, defaults filled in: adding a key with its default value keeps the key.
    fn params(&self) -> serde_json::Value;
    /// External things read (files, models, remote identities), resolved for hashing.
    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError>;
    /// Does the work, writing the artifact into `ctx.out_dir`.
    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError>;
    /// What running this stage will cost on this machine, and the sizes it hands downstream
    /// (`ragd-pipe plan`); by default a brief stage that passes sizes through.
    fn estimate(&self, input: &estimate::EstimateInput) -> Result<estimate::Estimate, StageError> {
        Ok(estimate::Estimate::brief(input.sizes))
    }
    /// For a stage whose work lies outside the store (registering a model), what is missing
    /// outside it although its artifact is cached, read from that artifact: the stage then runs
    /// again rather than reporting a cached success that is no longer true.
    fn effect_missing(&self, _artifact: &std::path::Path) -> Option<String> {
        None
    }
}

/// The static side of a stage, from which its [`StageSpec`] is built.
pub trait StageDef: Stage + Sized + 'static {
    const KIND: &'static str;
    /// The recipe section (snake_case of the kind).
    const SECTION: &'static str;
    /// One line for `ragd-pipe stages` and the schema.
    const ABOUT: &'static str;
    const PRODUCES: Artifact;
    type Params: DeserializeOwned + Serialize + JsonSchema + Default;

    /// Builds the stage from its parsed section, checking values that types cannot express.
    fn new(params: Self::Params, env: &RecipeEnv) -> Result<Self, Vec<Invalid>>;
}

/// Why a section could not become a stage.
#[derive(Debug)]
pub enum BuildError {
    /// The section does not deserialize; `path` is relative to the section.
    Type { path: Vec<String>, message: String },
    /// Values that deserialize but make no sense.
    Invalid(Vec<Invalid>),
}

/// Builds a stage from its section's YAML.
pub type BuildFn = fn(serde_yaml::Value, &RecipeEnv) -> Result<Box<dyn Stage>, BuildError>;

/// A registry entry: everything the loader, planner, schema and CLI need to know of a kind.
pub struct StageSpec {
    pub kind: &'static str,
    pub section: &'static str,
    pub about: &'static str,
    pub produces: Artifact,
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    pub build: BuildFn,
}

impl StageSpec {
    /// Whether `name` names this stage: its kind (`query-gen`) or its section (`query_gen`), as
    /// users may write either in `--only`, `--until`, `--force` and `from:`.
    pub fn is_named(&self, name: &str) -> bool {
        self.kind == name || self.section == name
    }
}

impl std::fmt::Debug for StageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageSpec")
            .field("kind", &self.kind)
            .finish()
    }
}

const fn spec<T: StageDef>() -> StageSpec {
    StageSpec {
        kind: T::KIND,
        section: T::SECTION,
        about: T::ABOUT,
        produces: T::PRODUCES,
        schema: schema_of::<T>,
        build: build::<T>,
    }
}

fn schema_of<T: StageDef>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T::Params>()
}

fn build<T: StageDef>(
    value: serde_yaml::Value,
    env: &RecipeEnv,
) -> Result<Box<dyn Stage>, BuildError> {
    // An empty section (`chunk:` with nothing under it) means "all defaults".
    let value = match value {
        serde_yaml::Value::Null => serde_yaml::Value::Mapping(serde_yaml::Mapping::new()),
        other => other,
    };
    let params: T::Params = serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        BuildError::Type {
            path,
            message: error.into_inner().to_string(),
        }
    })?;
    let stage = T::new(params, env).map_err(BuildError::Invalid)?;
    Ok(Box::new(stage))
}

/// Every stage kind, in canonical pipeline order.
pub static REGISTRY: &[StageSpec] = &[
    spec::<chunk::Chunk>(),
    spec::<query_gen::QueryGen>(),
    spec::<judge::Judge>(),
    spec::<mine::Mine>(),
    spec::<train::Train>(),
    spec::<train_reranker::TrainReranker>(),
    spec::<evaluate::Evaluate>(),
    spec::<register::Register>(),
];

/// The registry entry for a recipe section name.
pub fn by_section(section: &str) -> Option<&'static StageSpec> {
    REGISTRY.iter().find(|spec| spec.section == section)
}

/// The registry entry for a stage kind (`query-gen`) or its section name (`query_gen`).
pub fn by_kind(name: &str) -> Option<&'static StageSpec> {
    REGISTRY.iter().find(|spec| spec.is_named(name))
}
