//! The evaluate stage: base against fine-tuned (and BM25 as the floor) on the held-out split that
//! mine made and on the user's own labelled query sets, at every embedding dimension trained.
//!
//! Every system ranks the same corpus for the same queries, so comparisons are paired per query
//! (bootstrap intervals, permutation and sign tests in `crate::eval`). The report is written as
//! `report.json`, `report.md` and `report.html`; a fine-tuned model worse than its base beyond
//! noise raises the report's regression flag, which register reads.
//!
//! Every evaluate also scores base and fine-tuned on the general check built into the tool
//! ([`crate::eval::general`]), and, when the fine-tuned model truncates texts at another length
//! than its base, the base at that length too: gains are counted against the better base. The
//! report ends in a [`crate::eval::report::Verdict`] (`better`, `no clear difference`, `worse`),
//! in the summary as `verdict`, which register reads before making a model the default.
//!
//! With a reranker in the recipe (a `train_reranker:` section), each full-size dense system is
//! scored a second time as `retrieve+rerank`: its top `rerank_top_k` results reordered by the
//! cross-encoder, the rest left in place, compared pairwise with retrieval alone. A reranked
//! system worse beyond noise raises the report's `reranker_regression` flag, and register then
//! never makes the reranker ragd's default.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{self, Estimate, EstimateInput};
use super::io::{self, CHUNKS_FILE, FIRST_ROUND_DIR, HELDOUT_FILE, TRAIN_FILE, TrainingExample};
use super::io::{MERGE_FILE, MODEL_DIR, RERANKER_DIR, TRAIN_LOG_FILE};
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::corpus::Chunk;
use crate::eval::report::{
    DatasetRole, FilterShare, MergeSearch, RerankerRun, TrainingFacts, VERDICT_WORSE, VerdictRules,
};
use crate::eval::{
    self, BeirDataset, Dataset, HEADLINE_METRICS, Metric, PairedTestConfig, Report, RunScores,
    SystemKind, SystemSpec, TrainingCurve,
};
use crate::index::{Bm25Index, DenseIndex, Hit, truncate_and_normalize};
use crate::model::cross_encoder::CrossEncoder;
use crate::model::encoder::SentenceEncoder;
use crate::model::hub::SENTENCE_TRANSFORMER_FILES;
use crate::model::prompts::TextRole;

/// A labelled query set in BEIR format.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelledSet {
    /// Folder holding `corpus.jsonl`, `queries.jsonl` and `qrels/<split>.tsv`, relative to the
    /// recipe.
    pub path: PathBuf,
    /// The name in the report; default: the folder's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Which qrels file to score.
    #[serde(default = "default_split")]
    pub split: String,
}

fn default_split() -> String {
    "test".to_owned()
}

/// The `evaluate:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct EvaluateParams {
    /// Score the held-out queries of the mine stage (documents never seen in training) when the
    /// recipe mines training data.
    #[serde(default = "yes")]
    pub heldout: bool,
    /// Your own labelled queries, in BEIR format; list as many as you have.
    #[serde(default)]
    pub datasets: Vec<LabelledSet>,
    /// Embedding dimensions to score besides the model's own (Matryoshka truncations); the
    /// dimensions the model was trained at are always scored.
    #[serde(default)]
    pub dimensions: Vec<usize>,
    /// Score BM25 too: the floor a dense model should clear.
    #[serde(default = "yes")]
    pub bm25: bool,
    /// With a reranker in the recipe: how many of each dense system's top results it reorders.
    #[serde(default = "default_rerank_top_k")]
    pub rerank_top_k: usize,
    /// Texts per batch when encoding.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Bootstrap resamples for each confidence interval.
    #[serde(default = "default_resamples")]
    pub resamples: usize,
    /// Confidence level of the intervals (and 1 − the tests' significance level).
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// Score base and fine-tuned on the general check built into the tool (general-domain
    /// passages and questions): a fine-tune that forgets what its base knew is caught.
    #[serde(default = "yes")]
    pub general: bool,
    /// The most nDCG@10 the fine-tuned model may lose on the general check before it is
    /// flagged like a regression and the verdict says `worse`.
    #[serde(default = "default_general_max_drop")]
    pub general_max_drop: f64,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

fn yes() -> bool {
    true
}
fn default_batch() -> usize {
    64
}
fn default_rerank_top_k() -> usize {
    20
}
fn default_resamples() -> usize {
    10_000
}
fn default_confidence() -> f64 {
    0.95
}
fn default_general_max_drop() -> f64 {
    0.02
}

pub struct Evaluate {
    params: EvaluateParams,
    /// Each labelled set's folder, resolved against the recipe.
    dataset_dirs: Vec<PathBuf>,
    base_model: String,
    recipe_name: String,
    seed: u64,
}

impl StageDef for Evaluate {
    const KIND: &'static str = "evaluate";
    const SECTION: &'static str = "evaluate";
    const ABOUT: &'static str = "Score base against fine-tuned (and BM25) on held-out and labelled queries, with confidence intervals.";
    const PRODUCES: Artifact = Artifact::Evaluation;
    type Params = EvaluateParams;

    fn new(params: EvaluateParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        let mut dataset_dirs = Vec::new();
        for (index, set) in params.datasets.iter().enumerate() {
            let dir = env.dir.join(&set.path);
            let position = |key: &str| Invalid {
                path: vec!["datasets".to_owned(), index.to_string(), key.to_owned()],
                message: String::new(),
                help: None,
            };
            match eval::beir::files(&dir, &set.split)
                .into_iter()
                .find(|file| !file.is_file())
            {
                Some(missing) if !dir.is_dir() => invalid.push(Invalid {
                    message: format!("`{}` is not a folder", dir.display()),
                    help: Some(format!(
                        "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/; `{}` is missing",
                        missing.display()
                    )),
                    ..position("path")
                }),
                Some(missing) => invalid.push(Invalid {
                    message: format!("`{}` does not exist", missing.display()),
                    help: Some(
                        "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
                            .to_owned(),
                    ),
                    ..position(if missing.starts_with(dir.join("qrels")) {
                        "split"
                    } else {
                        "path"
                    })
                }),
                None => {}
            }
            dataset_dirs.push(dir);
        }
        if params.batch_size == 0 {
            invalid.push(Invalid::new(&["batch_size"], "must be at least 1"));
        }
        if params.resamples == 0 {
            invalid.push(Invalid::new(&["resamples"], "must be at least 1"));
        }
        if params.rerank_top_k < 2 {
            invalid.push(Invalid::new(
                &["rerank_top_k"],
                "must be at least 2: reranking one result changes nothing",
            ));
        }
        if !(params.confidence > 0.5 && params.confidence < 1.0) {
            invalid.push(Invalid::new(
                &["confidence"],
                format!("{} is not between 0.5 and 1", params.confidence),
            ));
        }
        if !(0.0..=1.0).contains(&params.general_max_drop) {
            invalid.push(Invalid::new(
                &["general_max_drop"],
                format!("{} is not between 0 and 1", params.general_max_drop),
            ));
        }
        if let Some(index) = params.dimensions.iter().position(|d| *d == 0) {
            invalid.push(Invalid {
                path: vec!["dimensions".to_owned(), index.to_string()],
                message: "must be at least 1".to_owned(),
                help: None,
            });
        }
        if invalid.is_empty() {
            Ok(Self {
                params,
                dataset_dirs,
                base_model: env.base_model.clone(),
                recipe_name: env.name.clone(),
                seed: env.seed,
            })
        } else {
            Err(invalid)
        }
    }
}

impl Stage for Evaluate {
    /// 2: the general check, the base also at the fine-tuned model's length, and the verdict.
    /// 3: warnings where the result rests on too little, and advice that knows the LLM wrote the
    /// queries.
    fn version(&self) -> u32 {
        3
    }

    fn inputs(&self) -> Vec<Input> {
        [
            Artifact::Chunks,
            Artifact::TrainingData,
            Artifact::Model,
            Artifact::Reranker,
        ]
        .map(|artifact| Input {
            artifact,
            required: false,
            instead: None,
        })
        .to_vec()
    }

    fn params(&self) -> serde_json::Value {
        let mut params = serde_json::to_value(&self.params).unwrap_or_default();
        params["seed"] = self.seed.into();
        if self.params.general {
            params["general_check"] = eval::general::general_check_digest().into();
        }
        params
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let heldout = if self.params.heldout {
            input.sizes.chunks.unwrap_or(0)
        } else {
            0
        };
        let labelled: u64 = self
            .dataset_dirs
            .iter()
            .zip(&self.params.datasets)
            .map(|(dir, set)| io::count_lines(&eval::beir::files(dir, &set.split)[0]))
            .sum();
        // The fine-tuned model embeds the chunks (the base's are cached by the judge), both
        // models each labelled corpus and the general check's passages, the queries besides.
        let queries = input.sizes.queries.unwrap_or(0) / 5 + 400;
        estimate::encoding(
            input,
            &self.base_model,
            heldout + 2 * labelled + 100,
            queries,
        )
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        let mut externals = vec![External::base_model(env, &self.base_model)?];
        externals.extend(External::encode_precision(env));
        for (set, dir) in self.params.datasets.iter().zip(&self.dataset_dirs) {
            // Named relative to the dataset folder: the key must not change when the project moves.
            let files = eval::beir::files(dir, &set.split)
                .iter()
                .map(|file| file.strip_prefix(dir).unwrap_or(file).to_path_buf())
                .collect();
            externals.push(External::Files {
                label: format!("dataset {}", set_name(set, dir)),
                root: dir.clone(),
                files,
            });
        }
        Ok(externals)
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let sets = self.sets(ctx)?;
        let systems = self.systems(ctx)?;
        let settings = PairedTestConfig {
            resamples: self.params.resamples,
            confidence: self.params.confidence,
            alpha: 1.0 - self.params.confidence,
            seed: self.seed,
            ..PairedTestConfig::default()
        };
        let mut datasets = Vec::new();
        for set in &sets {
            ctx.check_cancelled()?;
            datasets.push(self.score(ctx, set, &systems, &settings)?);
        }
        // The fine-tuned model's size, counted from its loaded weights.
        let parameters = systems
            .models
            .iter()
            .find(|m| m.kind == SystemKind::FineTuned)
            .map(|m| {
                m.encoder
                    .bert()
                    .vars()
                    .all_vars()
                    .iter()
                    .map(|v| v.elem_count() as u64)
                    .sum()
            });
        let mut report = Report::new(
            format!("{}: evaluation", self.recipe_name),
            settings,
            datasets,
            systems.training,
        );
        report.merge = systems.merge;
        report.date = Some(jiff::Zoned::now().strftime("%Y-%m-%d").to_string());
        self.conclude(ctx, &mut report, parameters);
        report.write(&ctx.out_dir).map_err(eval_error)?;
        tell(ctx, &report);
        Ok(StageOutcome {
            summary: summary(&report),
        })
    }
}

/// A model evaluate scores, and how the report names it.
struct ModelUnderTest {
    kind: SystemKind,
    label: String,
    reference: String,
    encoder: SentenceEncoder,
    digest: String,
}

/// Everything scored on each set, and what the training left that the report shows.
struct Systems {
    models: Vec<ModelUnderTest>,
    /// The reranker's name and model, when the recipe trains one.
    reranker: Option<(String, CrossEncoder)>,
    trained_dims: Vec<usize>,
    training: Option<TrainingCurve>,
    merge: Option<MergeSearch>,
}

/// What the run shows of the report: the metrics table, each comparison in words, the
/// regressions, the warnings and the verdict.
fn tell(ctx: &StageContext, report: &Report) {
    ctx.table(&metrics_table(report));
    for dataset in &report.datasets {
        for comparison in dataset
            .comparisons
            .iter()
            .filter(|c| c.metric == Metric::NDCG_10)
        {
            ctx.info(format!("{}: {}", dataset.name, comparison.sentence));
        }
    }
    if report.reranker_regression {
        ctx.warn(format!(
            "RERANKING MAKES RETRIEVAL WORSE beyond noise:\n  {}\nregister will not make the reranker ragd's default unless `register.allow_worse: true`",
            report.reranker_regressions.join("\n  ")
        ));
    }
    if report.regression {
        ctx.warn(format!(
            "THE FINE-TUNED MODEL IS WORSE THAN THE BASE beyond noise:\n  {}\nregister will not make it the default unless `register.allow_worse: true`",
            report.regressions.join("\n  ")
        ));
    }
    for warning in &report.warnings {
        ctx.warn(format!("trust: {warning}"));
    }
    if let Some(verdict) = &report.verdict {
        let text = format!(
            "verdict: {}. {}\nnext: {}",
            verdict.label, verdict.why, verdict.next
        );
        if verdict.label == VERDICT_WORSE {
            ctx.warn(text);
        } else {
            ctx.info(text);
        }
    }
}

impl Evaluate {
    /// The query sets: the held-out split, the user's labelled sets, the general check.
    fn sets(&self, ctx: &StageContext) -> Result<Vec<EvalSet>, StageError> {
        let mut sets = Vec::new();
        if self.params.heldout
            && let Ok(data) = ctx.input(Artifact::TrainingData)
        {
            match self.heldout_set(ctx, data)? {
                Some(set) => sets.push(set),
                None => ctx.warn(
                    "the held-out split is empty: raise `mine.heldout_fraction` to measure on documents training never saw",
                ),
            }
        }
        for (set, dir) in self.params.datasets.iter().zip(&self.dataset_dirs) {
            let data = BeirDataset::load(dir, &set.split).map_err(eval_error)?;
            sets.push(EvalSet::from_beir(
                set_name(set, dir),
                data,
                DatasetRole::User,
            ));
        }
        if self.params.general {
            let data = eval::general::general_check().map_err(eval_error)?;
            sets.push(EvalSet::from_beir(
                eval::general::GENERAL_CHECK_NAME.to_owned(),
                data,
                DatasetRole::General,
            ));
        }
        if sets.is_empty() {
            return Err(StageError::Failed(
                "there is nothing to evaluate on: no held-out split (run `mine`) and no `evaluate.datasets`".to_owned(),
            ));
        }
        Ok(sets)
    }

    /// The base (also at the fine-tuned model's length, like with like), the fine-tuned model
    /// and the reranker, with the training's log and merge.
    fn systems(&self, ctx: &StageContext) -> Result<Systems, StageError> {
        let base_dir = ctx
            .env
            .resolve_model(&self.base_model, SENTENCE_TRANSFORMER_FILES)?;
        let base_digest = io::model_digest(&base_dir)?;
        let base = io::load_encoder_dir(&ctx.env, &base_dir)?;
        let base_length = base.max_seq_length();
        let mut systems = Systems {
            models: vec![ModelUnderTest {
                kind: SystemKind::Base,
                label: SystemKind::Base.name().to_owned(),
                reference: self.base_model.clone(),
                encoder: base,
                digest: base_digest.clone(),
            }],
            reranker: None,
            trained_dims: Vec::new(),
            training: None,
            merge: None,
        };
        if let Ok(artifact) = ctx.input(Artifact::Model) {
            let dir = artifact.join(MODEL_DIR);
            let tuned = io::load_encoder_dir(&ctx.env, &dir)?;
            // Like with like: truncation alone moves a model, so the base is also scored at the
            // length the fine-tuned model runs at.
            let length = tuned.max_seq_length();
            if length != base_length {
                let base = io::load_encoder_dir(&ctx.env, &base_dir)?
                    .with_max_seq_length(length)
                    .map_err(io::model_error)?;
                systems.models.push(ModelUnderTest {
                    kind: SystemKind::Base,
                    label: format!("{} ({length} tokens)", SystemKind::Base.name()),
                    reference: self.base_model.clone(),
                    encoder: base,
                    digest: base_digest,
                });
            }
            let first_round = artifact.join(FIRST_ROUND_DIR).join(MODEL_DIR);
            if first_round.is_dir() {
                systems.models.push(ModelUnderTest {
                    kind: SystemKind::FirstRound,
                    label: SystemKind::FirstRound.name().to_owned(),
                    reference: first_round.display().to_string(),
                    encoder: io::load_encoder_dir(&ctx.env, &first_round)?,
                    digest: io::model_digest(&first_round)?,
                });
            }
            systems.models.push(ModelUnderTest {
                kind: SystemKind::FineTuned,
                label: SystemKind::FineTuned.name().to_owned(),
                reference: dir.display().to_string(),
                encoder: tuned,
                digest: io::model_digest(&dir)?,
            });
            systems.trained_dims = recorded_dimensions(&dir);
            let merge_file = artifact.join(MERGE_FILE);
            if merge_file.is_file() {
                systems.merge = Some(serde_json::from_str::<MergeSearch>(
                    &fs_err::read_to_string(&merge_file)?,
                )?);
            }
            let log = artifact.join(TRAIN_LOG_FILE);
            if log.is_file() {
                systems.training = Some(TrainingCurve::from_jsonl(&log).map_err(eval_error)?);
            }
        } else {
            ctx.info("no fine-tuned model in this recipe: scoring the base model only");
        }
        if let Ok(artifact) = ctx.input(Artifact::Reranker) {
            let dir = artifact.join(RERANKER_DIR);
            systems.reranker = Some((
                dir.display().to_string(),
                io::load_cross_encoder_dir(&ctx.env, &dir)?,
            ));
        }
        Ok(systems)
    }

    /// Every system's scores on `set` (BM25, each model at each dimension, reranked), and the
    /// paired comparisons between them.
    fn score(
        &self,
        ctx: &StageContext,
        set: &EvalSet,
        systems: &Systems,
        settings: &PairedTestConfig,
    ) -> Result<Dataset, StageError> {
        let metrics = eval::default_metrics();
        let mut dataset = Dataset::new(&set.name, set.documents.len(), set.query_ids());
        dataset.role = set.role;
        if self.params.bm25 {
            let ranked = set.rank_bm25(ctx, eval::max_k(&metrics))?;
            let scores = set.score(&ranked, &metrics);
            let spec = SystemSpec {
                label: "bm25".to_owned(),
                kind: SystemKind::Bm25,
                model: None,
                dimension: None,
                reranker: None,
                max_seq_length: None,
            };
            dataset
                .add_system(spec, scores, settings)
                .map_err(eval_error)?;
        }
        let mut reranked = Vec::new();
        let mut scored_pairs = HashMap::new();
        for tested in &systems.models {
            let encoder = &tested.encoder;
            let dims = self.dimensions(encoder.dim(), &systems.trained_dims);
            let model = (encoder, tested.digest.as_str());
            for (dim, ranked) in
                set.rank_dense(ctx, model, &dims, self.params.batch_size, &metrics)?
            {
                let label = if dim == encoder.dim() {
                    tested.label.clone()
                } else {
                    format!("{}@{dim}", tested.label)
                };
                let spec = SystemSpec {
                    label: label.clone(),
                    kind: tested.kind,
                    model: Some(tested.reference.clone()),
                    dimension: Some(dim),
                    reranker: None,
                    max_seq_length: Some(encoder.max_seq_length()),
                };
                let scores = set.score(&ranked, &metrics);
                dataset
                    .add_system(spec, scores, settings)
                    .map_err(eval_error)?;
                if let Some((name, cross_encoder)) = &systems.reranker
                    && dim == encoder.dim()
                {
                    let top_k = self.params.rerank_top_k;
                    let reader = (cross_encoder, &mut scored_pairs);
                    let (ranked, seconds_per_query) =
                        set.rerank(ctx, reader, &ranked, top_k, self.params.batch_size)?;
                    let spec = SystemSpec {
                        label: format!("{label}+rerank"),
                        kind: SystemKind::Reranked,
                        model: Some(tested.reference.clone()),
                        dimension: Some(dim),
                        reranker: Some(RerankerRun {
                            model: name.clone(),
                            top_k,
                            seconds_per_query,
                        }),
                        max_seq_length: Some(encoder.max_seq_length()),
                    };
                    reranked.push((label, spec.label.clone(), seconds_per_query));
                    let scores = set.score(&ranked, &metrics);
                    dataset
                        .add_system(spec, scores, settings)
                        .map_err(eval_error)?;
                }
            }
        }
        dataset
            .compare_fine_tuned_with_base(&HEADLINE_METRICS, settings)
            .map_err(eval_error)?;
        for (retriever, label, seconds) in reranked {
            dataset
                .compare(&retriever, &label, &HEADLINE_METRICS, settings)
                .map_err(eval_error)?;
            ctx.info(format!(
                "{}: reranking the top {} of `{retriever}` took {:.0} ms per query",
                set.name,
                self.params.rerank_top_k,
                seconds * 1e3
            ));
        }
        Ok(dataset)
    }

    /// The verdict, and the warnings where the result rests on too little (from the training
    /// data mine handed on).
    fn conclude(&self, ctx: &StageContext, report: &mut Report, parameters: Option<u64>) {
        let data = ctx.inputs.get(&Artifact::TrainingData);
        let provenance = data.and_then(|dir| io::Provenance::read(dir));
        report.conclude(VerdictRules {
            general_max_drop: self.params.general_max_drop,
            queries_by_llm: provenance
                .as_ref()
                .is_some_and(|p| p.by_strategy.contains_key("llm")),
        });
        if report.training.is_some() {
            let steps = report
                .training
                .as_ref()
                .and_then(|curve| curve.points.last())
                .map(|point| point.step);
            report.warn_where_untrustworthy(&TrainingFacts {
                examples: data.map(|dir| io::count_lines(&dir.join(TRAIN_FILE)) as usize),
                parameters,
                steps,
                filters: provenance
                    .into_iter()
                    .flat_map(|p| p.filters)
                    .map(|f| FilterShare {
                        stage: f.stage,
                        filter: f.filter,
                        dropped: f.dropped,
                        of: f.of,
                    })
                    .collect(),
            });
        }
    }

    /// The model's own dimension first, then every smaller trained or requested one, largest
    /// first.
    fn dimensions(&self, full: usize, trained: &[usize]) -> Vec<usize> {
        let smaller: BTreeSet<usize> = trained
            .iter()
            .chain(&self.params.dimensions)
            .copied()
            .filter(|d| *d < full)
            .collect();
        std::iter::once(full)
            .chain(smaller.into_iter().rev())
            .collect()
    }

    /// The held-out queries against every chunk when the recipe chunks, else against every
    /// passage the training data names.
    fn heldout_set(&self, ctx: &StageContext, data: &Path) -> Result<Option<EvalSet>, StageError> {
        let heldout: Vec<TrainingExample> = io::read_jsonl(&data.join(HELDOUT_FILE))?;
        if heldout.is_empty() {
            return Ok(None);
        }
        let documents: Vec<(String, String)> = match ctx.input(Artifact::Chunks) {
            Ok(chunks) => io::read_jsonl::<Chunk>(&chunks.join(CHUNKS_FILE))?
                .iter()
                .map(|chunk| (chunk.id.clone(), io::passage(chunk)))
                .collect(),
            Err(_) => {
                let train: Vec<TrainingExample> = io::read_jsonl(&data.join(TRAIN_FILE))?;
                let mut seen = HashSet::new();
                train
                    .iter()
                    .chain(&heldout)
                    .flat_map(|example| {
                        std::iter::once((example.positive_id.clone(), example.positive.clone()))
                            .chain(
                                example
                                    .negatives
                                    .iter()
                                    .chain(&example.extra_positives)
                                    .map(|n| (n.id.clone(), n.text.clone())),
                            )
                    })
                    .filter(|(id, _)| seen.insert(id.clone()))
                    .collect()
            }
        };
        let mut queries = Vec::new();
        let mut relevant = HashMap::new();
        for (index, example) in heldout.into_iter().enumerate() {
            let id = format!("heldout-{index}");
            relevant.insert(id.clone(), example.answer_ids());
            queries.push((id, example.query));
        }
        Ok(Some(EvalSet {
            name: "held-out".to_owned(),
            role: DatasetRole::HeldOut,
            documents,
            queries,
            relevant,
        }))
    }
}

fn set_name(set: &LabelledSet, dir: &Path) -> String {
    set.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string())
    })
}

/// The Matryoshka dimensions a model was trained at, from its `training_metadata.json`.
fn recorded_dimensions(model_dir: &Path) -> Vec<usize> {
    let Ok(text) = fs_err::read_to_string(model_dir.join("training_metadata.json")) else {
        return Vec::new();
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|meta| meta.get("matryoshka_dims").cloned())
        .and_then(|dims| serde_json::from_value(dims).ok())
        .unwrap_or_default()
}

fn eval_error(error: eval::EvalError) -> StageError {
    StageError::engine(error)
}

/// One query set: documents `(id, text)`, queries `(id, text)` and the relevant ids per query.
struct EvalSet {
    name: String,
    role: DatasetRole,
    documents: Vec<(String, String)>,
    queries: Vec<(String, String)>,
    relevant: HashMap<String, HashSet<String>>,
}

/// Ranked document ids per scored query.
type Rankings = Vec<Vec<String>>;

impl EvalSet {
    /// BEIR joins a document's title and text for the model to read, as sentence-transformers'
    /// evaluation does; queries without a relevant document are not scored.
    fn from_beir(name: String, data: BeirDataset, role: DatasetRole) -> Self {
        let queries = data
            .queries
            .into_iter()
            .filter(|(id, _)| data.relevant.get(id).is_some_and(|r| !r.is_empty()))
            .collect();
        Self {
            name,
            role,
            documents: data
                .documents
                .into_iter()
                .map(|doc| (doc.id, io::passage_of(&doc.title, &doc.text)))
                .collect(),
            queries,
            relevant: data.relevant,
        }
    }

    fn query_ids(&self) -> Vec<String> {
        self.queries.iter().map(|(id, _)| id.clone()).collect()
    }

    fn query_texts(&self) -> Vec<&str> {
        self.queries.iter().map(|(_, text)| text.as_str()).collect()
    }

    fn ids(&self, hits: Vec<Vec<Hit>>) -> Rankings {
        hits.into_iter()
            .map(|hits| {
                hits.into_iter()
                    .map(|hit| self.documents[hit.doc].0.clone())
                    .collect()
            })
            .collect()
    }

    fn score(&self, ranked: &Rankings, metrics: &[Metric]) -> RunScores {
        let empty = HashSet::new();
        RunScores::evaluate(
            self.queries.iter().zip(ranked).map(|((id, _), ranked)| {
                (
                    id.as_str(),
                    ranked.as_slice(),
                    self.relevant.get(id).unwrap_or(&empty),
                )
            }),
            metrics,
        )
    }

    fn rank_bm25(&self, ctx: &StageContext, k: usize) -> Result<Rankings, StageError> {
        // BM25 needs unique ids; positions name documents in hits anyway.
        let keys: Vec<String> = (0..self.documents.len()).map(|i| i.to_string()).collect();
        let docs: Vec<(&str, &str)> = keys
            .iter()
            .zip(&self.documents)
            .map(|(key, (_, text))| (key.as_str(), text.as_str()))
            .collect();
        let index = Bm25Index::build(&docs, None).map_err(io::index_error)?;
        let bar = ctx.progress(
            &format!("{}: BM25", self.name),
            Some(self.queries.len() as u64),
        );
        let hits = index
            .search_batch(&self.query_texts(), k, &|n| bar.inc(n as u64))
            .map_err(io::index_error)?;
        Ok(self.ids(hits))
    }

    /// `ranked` with each query's top `top_k` reordered by the cross-encoder's scores (stable
    /// on ties), the rest in place; and the seconds scoring took per query. Scores are kept in
    /// `scored` by (query, document), so a second system's lists reuse the pairs they share
    /// with the first; the time per query is the time per pair scored times `top_k`.
    fn rerank(
        &self,
        ctx: &StageContext,
        (reranker, scored): (&CrossEncoder, &mut PairScores),
        ranked: &Rankings,
        top_k: usize,
        batch_size: usize,
    ) -> Result<(Rankings, f64), StageError> {
        let position: HashMap<&str, usize> = self
            .documents
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (id.as_str(), i))
            .collect();
        let heads: Vec<Vec<usize>> = ranked
            .iter()
            .map(|ids| {
                ids.iter()
                    .take(top_k)
                    .filter_map(|id| position.get(id.as_str()).copied())
                    .collect()
            })
            .collect();
        let mut missing: Vec<(usize, usize)> = heads
            .iter()
            .enumerate()
            .flat_map(|(q, docs)| docs.iter().map(move |&d| (q, d)))
            .filter(|pair| !scored.contains_key(pair))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let pairs: Vec<(&str, &str)> = missing
            .iter()
            .map(|&(q, d)| (self.queries[q].1.as_str(), self.documents[d].1.as_str()))
            .collect();
        let bar = ctx.progress(
            &format!("{}: reranking", self.name),
            Some(pairs.len() as u64),
        );
        let started = Instant::now();
        let scores = reranker
            .score(&pairs, batch_size, &mut |n| bar.set(n as u64))
            .map_err(io::model_error)?;
        let seconds_per_pair = started.elapsed().as_secs_f64() / pairs.len().max(1) as f64;
        drop(bar);
        scored.extend(missing.into_iter().zip(scores));
        let reranked = heads
            .iter()
            .zip(ranked)
            .enumerate()
            .map(|(q, (docs, ids))| {
                let mut order: Vec<usize> = docs.clone();
                order.sort_by(|a, b| scored[&(q, *b)].total_cmp(&scored[&(q, *a)]));
                order
                    .iter()
                    .map(|&d| self.documents[d].0.clone())
                    .chain(ids.iter().skip(docs.len()).cloned())
                    .collect()
            })
            .collect();
        Ok((reranked, seconds_per_pair * top_k as f64))
    }

    /// Rankings at each of `dims` (truncated and renormalised embeddings), from one encoding.
    fn rank_dense(
        &self,
        ctx: &StageContext,
        (encoder, model_digest): (&SentenceEncoder, &str),
        dims: &[usize],
        batch_size: usize,
        metrics: &[Metric],
    ) -> Result<Vec<(usize, Rankings)>, StageError> {
        let texts: Vec<&str> = self.documents.iter().map(|(_, t)| t.as_str()).collect();
        let label = format!("{}: encoding documents", self.name);
        let docs = io::encode_cached(ctx, encoder, model_digest, &texts, batch_size, &label)?;
        ctx.check_cancelled()?;
        let queries = encoder
            .encode_as(
                &self.query_texts(),
                TextRole::Query,
                batch_size,
                &mut |_| {},
            )
            .map_err(io::model_error)?;
        let full = encoder.dim();
        let mut rankings = Vec::with_capacity(dims.len());
        for &dim in dims {
            let doc_vectors =
                truncate_and_normalize(docs.as_slice(), full, dim).map_err(io::index_error)?;
            let query_vectors =
                truncate_and_normalize(queries.as_slice(), full, dim).map_err(io::index_error)?;
            let index = DenseIndex::new(dim, doc_vectors).map_err(io::index_error)?;
            let hits = index
                .search_batch(&query_vectors, eval::max_k(metrics), &|_| {})
                .map_err(io::index_error)?;
            rankings.push((dim, self.ids(hits)));
        }
        Ok(rankings)
    }
}

/// Reranked candidate lists: a query and a document id, by their positions.
type PairScores = HashMap<(usize, usize), f32>;

/// The headline metrics of every system, one row per dataset and system.
fn metrics_table(report: &Report) -> Table {
    let mut columns = vec!["dataset".to_owned(), "system".to_owned()];
    columns.extend(HEADLINE_METRICS.iter().map(|m| m.label()));
    let rows = report
        .datasets
        .iter()
        .flat_map(|dataset| {
            dataset.systems.iter().map(|system| {
                let mut row = vec![
                    format!("{} ({} queries)", dataset.name, dataset.query_ids.len()),
                    system.label.clone(),
                ];
                row.extend(HEADLINE_METRICS.iter().map(|metric| {
                    system
                        .metrics
                        .get(metric)
                        .map(|m| format!("{:.4}", m.mean))
                        .unwrap_or_default()
                }));
                row
            })
        })
        .collect();
    Table {
        title: "retrieval quality (mean over queries)".to_owned(),
        columns,
        rows,
    }
}

/// The regression flag and headline means: what the lock and `--json` show without opening
/// the report.
fn summary(report: &Report) -> serde_json::Value {
    serde_json::json!({
        "regression": report.regression,
        "verdict": report.verdict,
        "datasets": report.headline_means(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> EvalSet {
        EvalSet {
            name: "t".to_owned(),
            role: DatasetRole::User,
            documents: vec![
                ("a".to_owned(), "the cat sat on the mat".to_owned()),
                ("b".to_owned(), "dogs bark at night".to_owned()),
                ("c".to_owned(), "a mat for the kitchen".to_owned()),
            ],
            queries: vec![
                ("q1".to_owned(), "cat on a mat".to_owned()),
                ("q2".to_owned(), "why do dogs bark".to_owned()),
            ],
            relevant: HashMap::from([
                ("q1".to_owned(), HashSet::from(["a".to_owned()])),
                ("q2".to_owned(), HashSet::from(["b".to_owned()])),
            ]),
        }
    }

    #[test]
    fn scores_align_rankings_with_queries() {
        let set = set();
        let ranked = vec![
            vec!["c".to_owned(), "a".to_owned(), "b".to_owned()],
            vec!["b".to_owned(), "a".to_owned(), "c".to_owned()],
        ];
        let scores = set.score(&ranked, &[Metric::MRR_10, Metric::ACCURACY_1]);
        assert_eq!(scores.query_ids, vec!["q1", "q2"]);
        assert_eq!(scores.values[&Metric::MRR_10], vec![0.5, 1.0]);
        assert_eq!(scores.values[&Metric::ACCURACY_1], vec![0.0, 1.0]);
    }

    #[test]
    fn dimensions_put_the_full_one_first_and_drop_impossible_ones() {
        let stage = Evaluate {
            params: EvaluateParams {
                dimensions: vec![64, 512, 128],
                ..EvaluateParams::default()
            },
            dataset_dirs: Vec::new(),
            base_model: String::new(),
            recipe_name: String::new(),
            seed: 0,
        };
        assert_eq!(stage.dimensions(384, &[128, 256]), vec![384, 256, 128, 64]);
    }
}
