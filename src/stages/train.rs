//! The train stage: fine-tunes the base model on the training examples (mine's `train.jsonl`, or
//! a `data` file from outside the pipeline) with MultipleNegativesRankingLoss, GradCache,
//! optional Matryoshka dimensions, AdamW and a warmup/decay schedule (see [`crate::model::train`]).
//!
//! Output: `model/` (a sentence-transformers folder with `training_metadata.json` and a model
//! card) and `train_log.jsonl` (one line per optimiser step: `step`, `epoch`, `loss`, `lr`,
//! `grad_norm`, `examples_per_s`), which evaluate plots. Checkpoints go to the journal every
//! `checkpoint_every` steps, so an interrupted run resumes where it left off. With mine's
//! `rounds: 2`, `round1/` holds the first round's model, its log and the data mined with it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{self, Estimate, EstimateInput, Speeds, texts_per_example};
use super::io::{
    self, FIRST_ROUND_DIR, HELDOUT_FILE, MERGE_FILE, MODEL_DIR, SECOND_ROUND_TRAIN_FILE,
    TRAIN_FILE, TRAIN_LOG_FILE, TrainingExample,
};
use super::mine::SecondRound;
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::eval::report::{MergeSearch, MergeTrial};
use crate::eval::stats::format_p;
use crate::eval::{self, Metric, PairedTestConfig, RunScores, Verdict, compare_paired};
use crate::index::{DenseIndex, truncate_and_normalize};
use crate::model::device;
use crate::model::encoder::SentenceEncoder;
use crate::model::hub::SENTENCE_TRANSFORMER_FILES;
use crate::model::merge::Interpolation;
use crate::model::prompts::TextRole;
use crate::model::train::save::{TrainingMetadata, save_model};
use crate::model::train::{
    AdamWConfig, LossConfig, TokenizedExample, TokenizedText, TrainConfig, TrainError, TrainModel,
    TrainOutcome, Trainer,
};

/// Tokens a training batch is padded to: its longest passage, about twice the mean of chunks
/// cut at headings and paragraphs, at most `max_seq_length`.
fn padded_tokens(max_seq_length: usize, mean_tokens: Option<u64>) -> usize {
    mean_tokens.map_or(max_seq_length, |mean| {
        (2 * mean as usize).min(max_seq_length)
    })
}

/// The `train:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TrainParams {
    /// The model to fine-tune (a hub id or a folder); the recipe's `base_model` when unset.
    #[serde(default)]
    pub model: Option<String>,
    /// Passes over the training examples.
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    /// Examples per optimiser step; each example's positive is a negative for the others, so
    /// larger batches train better (sentence-transformers suggests 32 to 256+).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Examples embedded at once. A larger `batch_size` runs as GradCache over mini-batches of
    /// this size: the same gradients in memory bounded by the mini-batch, for one more forward
    /// pass (about a fifth of a step). Set it to `batch_size` where memory allows.
    #[serde(default = "default_mini_batch_size")]
    pub mini_batch_size: usize,
    /// Peak learning rate of AdamW.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Share of the steps over which the learning rate warms up from zero, before decaying
    /// linearly.
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay (not applied to biases and LayerNorm parameters).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip the gradients' global norm to this; `null` never clips.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Cosine similarities are multiplied by this before the softmax (the inverse temperature).
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Also train positives to pick their query among the batch's queries.
    #[serde(default)]
    pub symmetric: bool,
    /// Use each example's mined hard negatives as extra wrong answers for the whole batch.
    #[serde(default = "yes")]
    pub hard_negatives: bool,
    /// Matryoshka: also train embeddings truncated to these dimensions (each at most the
    /// model's), so they can be cut short at search time.
    #[serde(default)]
    pub matryoshka_dims: Option<Vec<usize>>,
    /// Truncate texts at this many tokens instead of the model's own `max_seq_length`; the
    /// trained model embeds at it too unless `save_length` says otherwise.
    #[serde(default)]
    pub max_seq_length: Option<usize>,
    /// The length the saved model embeds at, when `max_seq_length` differs from the base's own:
    /// `training` (the length it trained at: fastest to embed), `base` (the base's, which it
    /// was pre-trained for: longer passages are read whole), or `auto`: the base's only when it
    /// scores a higher nDCG@10 on the held-out split beyond noise (paired bootstrap and
    /// permutation test, 95%).
    #[serde(default)]
    pub save_length: SaveLength,
    /// Batch texts of similar length together (less padding, faster on CPU); batches stay in a
    /// shuffled order.
    #[serde(default)]
    pub group_by_length: bool,
    /// Save a checkpoint every this many steps, to resume an interrupted run.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Stop after this many optimiser steps.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// A training-data JSONL file (ragd's format, as mine writes) to train on instead of the
    /// output of a `mine:` section. Relative to the recipe's folder.
    #[serde(default)]
    pub data: Option<String>,
    /// Merge the trained weights with the base's: the saved model is `α·fine-tuned +
    /// (1−α)·base`. `auto` tries α in 1, 0.75, 0.5, 0.25 and 0, and keeps the one best on the
    /// held-out split among those that lose at most `general_max_drop` nDCG@10 on the general
    /// check (held-out scoring stops once it falls); a number between 0 and 1 fixes α; `none`
    /// keeps the weights as trained.
    #[serde(default)]
    pub merge: MergeSetting,
    /// The most nDCG@10 a merge may lose on the general check against the base.
    #[serde(default = "default_general_max_drop")]
    pub general_max_drop: f64,
    /// GISTEmbed's guide against false negatives: with `base`, the model trained from (frozen)
    /// scores every in-batch and mined negative, and those it scores at or above the positive minus
    /// `guide_margin` are left out of the loss; `none` trains without. Costs one more forward
    /// pass per step.
    #[serde(default)]
    pub guide: GuideSetting,
    /// How far below the positive the guide's score of a negative may come before it is left
    /// out; 0 leaves out only negatives the guide scores at or above the positive (duplicates).
    #[serde(default)]
    pub guide_margin: f64,
    /// Distil a cross-encoder's judgement into the model (MarginMSE): for each example's mined
    /// negatives, the model's margin between positive and negative is pulled towards the
    /// cross-encoder's, on top of the ranking loss. Needs `hard_negatives`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillParams>,
}

/// `train.distill`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct DistillParams {
    /// The teacher: a cross-encoder (hub id or folder, e.g. `cross-encoder/ms-marco-MiniLM-L6-v2`
    /// or a reranker an earlier run registered).
    pub teacher: String,
    /// The MarginMSE term's weight against the ranking loss.
    #[serde(default = "default_distill_weight")]
    pub weight: f64,
}

fn default_distill_weight() -> f64 {
    1.0
}

/// `train.guide`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuideSetting {
    /// The model trained from, frozen.
    Base,
    /// No guide.
    #[default]
    None,
}

/// `train.merge`: how much of the fine-tuned model the saved model keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum MergeSetting {
    /// `auto` or `none`.
    Named(MergeMode),
    /// A fixed α, between 0 (the base) and 1 (the fine-tuned model).
    Alpha(f64),
}

impl Default for MergeSetting {
    fn default() -> Self {
        Self::Named(MergeMode::Auto)
    }
}

/// The named `train.merge` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    /// Choose α on the held-out split, guarded by the general check.
    Auto,
    /// Keep the trained weights.
    None,
}

/// The `train.save_length` settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SaveLength {
    /// Embed at the training length.
    #[default]
    Training,
    /// Embed at the base model's own length.
    Base,
    /// Choose between the two on the held-out split.
    Auto,
}

/// The length the model was saved to embed at, and the held-out figures it was chosen on.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct LengthChoice {
    tokens: usize,
    why: String,
    /// Held-out nDCG@10 at each length tried, as (tokens, nDCG@10).
    trials: Vec<(usize, f64)>,
}

impl Default for TrainParams {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

fn yes() -> bool {
    true
}
fn default_epochs() -> u64 {
    1
}
fn default_batch_size() -> usize {
    32
}
fn default_mini_batch_size() -> usize {
    16
}
fn default_learning_rate() -> f64 {
    2e-5
}
fn default_warmup_ratio() -> f64 {
    0.1
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_scale() -> f64 {
    20.
}
fn default_checkpoint_every() -> u64 {
    50
}
fn default_general_max_drop() -> f64 {
    0.02
}

/// The α `merge: auto` tries, in this order: the fine-tuned model first, the base last.
const MERGE_ALPHAS: [f64; 5] = [1.0, 0.75, 0.5, 0.25, 0.0];
/// At most this many passages make the corpus α is scored on: the held-out examples' own,
/// then training positives as distractors.
const MERGE_CORPUS_LIMIT: usize = 2000;
/// Pairs per batch when the teacher scores.
const TEACHER_BATCH: usize = 32;
/// Texts per batch when scoring a merge.
const MERGE_ENCODE_BATCH: usize = 64;

/// Pools of this many batches are sorted by length when `group_by_length` is on: large enough
/// to find similar lengths, small enough that the order stays random.
const LENGTH_POOL_BATCHES: usize = 50;

pub struct Train {
    params: TrainParams,
    model: String,
    data: Option<PathBuf>,
    seed: u64,
    config: TrainConfig,
}

impl StageDef for Train {
    const KIND: &'static str = "train";
    const SECTION: &'static str = "train";
    const ABOUT: &'static str =
        "Fine-tune the embedding model on the training examples (ranking loss, GradCache, AdamW).";
    const PRODUCES: Artifact = Artifact::Model;
    type Params = TrainParams;

    fn new(params: TrainParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        let config = TrainConfig {
            epochs: params.epochs,
            batch_size: params.batch_size,
            mini_batch_size: params.mini_batch_size,
            learning_rate: params.learning_rate,
            warmup_ratio: params.warmup_ratio,
            adamw: AdamWConfig {
                weight_decay: params.weight_decay,
                ..AdamWConfig::default()
            },
            decay_all: false,
            max_grad_norm: params.max_grad_norm,
            loss: LossConfig {
                scale: params.scale,
                symmetric: params.symmetric,
                matryoshka_dims: params.matryoshka_dims.clone(),
                guide_margin: (params.guide == GuideSetting::Base).then_some(params.guide_margin),
                distill_weight: params.distill.as_ref().map(|d| d.weight),
            },
            seed: env.seed,
            dropout: true,
            max_steps: params.max_steps,
            checkpoint_every: Some(params.checkpoint_every),
            length_pool_batches: params.group_by_length.then_some(LENGTH_POOL_BATCHES),
        };
        if let Err(TrainError::InvalidConfig { name, why }) = config.check() {
            invalid.push(Invalid::new(&[name], why));
        }
        check_weight_decay(params.weight_decay, &mut invalid);
        if params.max_seq_length.is_some_and(|n| n < 2) {
            invalid.push(Invalid::new(
                &["max_seq_length"],
                "must leave room for the special tokens and a word (at least 2)",
            ));
        }
        if let MergeSetting::Alpha(alpha) = params.merge
            && !(0.0..=1.0).contains(&alpha)
        {
            invalid.push(Invalid::new(
                &["merge"],
                format!("{alpha} is not between 0 and 1 (or `auto`, or `none`)"),
            ));
        }
        if let Some(distill) = &params.distill {
            if !(distill.weight.is_finite() && distill.weight > 0.0) {
                invalid.push(Invalid::new(
                    &["distill", "weight"],
                    "must be a positive number",
                ));
            }
            if !params.hard_negatives {
                invalid.push(
                    Invalid::new(&["distill"], "needs mined negatives to distil margins over")
                        .with_help("set `hard_negatives: true`"),
                );
            }
        }
        if !(params.guide_margin.is_finite() && params.guide_margin >= 0.0) {
            invalid.push(Invalid::new(&["guide_margin"], "must be zero or positive"));
        }
        if !(0.0..=1.0).contains(&params.general_max_drop) {
            invalid.push(Invalid::new(
                &["general_max_drop"],
                format!("{} is not between 0 and 1", params.general_max_drop),
            ));
        }
        let data = data_file(params.data.as_deref(), env, &mut invalid);
        if !invalid.is_empty() {
            return Err(invalid);
        }
        Ok(Self {
            model: params
                .model
                .clone()
                .unwrap_or_else(|| env.base_model.clone()),
            data,
            seed: env.seed,
            config,
            params,
        })
    }
}

impl Stage for Train {
    /// 2: empty and repeated rows of the training data are skipped. 3: merged with the base
    /// (`merge`). 4: each group embedded in passes cut by length (other dropout masks).
    fn version(&self) -> u32 {
        4
    }

    fn inputs(&self) -> Vec<Input> {
        if self.data.is_some() {
            return Vec::new();
        }
        vec![Input {
            artifact: Artifact::TrainingData,
            required: true,
            instead: Some("data"),
        }]
    }

    /// Everything but `data`: the data file's bytes enter the key through the externals.
    fn params(&self) -> serde_json::Value {
        let mut params = keyed_params(
            serde_json::to_value(&self.params).unwrap_or_default(),
            &self.model,
            self.seed,
        );
        if self.params.merge != MergeSetting::Named(MergeMode::None) {
            params["general_check"] = eval::general::general_check_digest().into();
        }
        params
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        let mut externals = model_and_data_externals(env, &self.model, self.data.as_deref())?;
        if let Some(distill) = &self.params.distill {
            externals.push(External::model(env, "distill.teacher", &distill.teacher)?);
        }
        Ok(externals)
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let examples = estimate::training_examples(input, self.data.as_deref());
        let negatives = if self.params.hard_negatives {
            input.sizes.negatives.unwrap_or(0)
        } else {
            0
        };
        let mini_batch = self.config.mini_batch_size.min(self.config.batch_size);
        let speed = input.speeds.encoder(
            input.env,
            &self.model,
            self.params.max_seq_length,
            mini_batch,
        )?;
        let tokens = padded_tokens(
            self.params.max_seq_length.unwrap_or(speed.model_tokens),
            input.sizes.chunk_tokens,
        );
        let mut trained = examples * self.params.epochs;
        if let Some(max_steps) = self.params.max_steps {
            trained = trained.min(max_steps * self.config.batch_size as u64);
        }
        let texts = trained as f64 * texts_per_example(negatives);
        let rounds = input.sizes.rounds.unwrap_or(1).max(1);
        let mut seconds = rounds as f64 * speed.train(texts as u64, tokens);
        if rounds > 1 {
            // Mining again: the first round's model embeds every chunk and training query.
            let chunks = input.sizes.chunks.unwrap_or(0);
            seconds += speed.encode(chunks + examples, tokens);
        }
        let mut peak_bytes = speed.train_peak(mini_batch, 2 + negatives as usize, tokens);
        if self.params.distill.is_some() {
            // The teacher, a cross-encoder, reads each (query, positive) and (query, negative).
            seconds += rounds as f64 * speed.encode(examples * (1 + negatives), tokens);
        }
        if self.params.guide == GuideSetting::Base {
            // The guide, a second copy of the base, encodes every text without gradients.
            seconds += speed.encode(texts as u64, tokens);
            peak_bytes += speed.weight_bytes;
        }
        if self.params.merge != MergeSetting::Named(MergeMode::None) {
            let corpus = input
                .sizes
                .chunks
                .unwrap_or(0)
                .min(MERGE_CORPUS_LIMIT as u64);
            // The held-out corpus for α = 1 and for the α where it falls, most often the next.
            seconds += 2.0 * speed.encode(corpus + 100, tokens);
        }
        Ok(Estimate {
            seconds,
            peak_bytes,
            basis: speed.basis,
            sizes: input.sizes,
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let (examples, data_hash) = read_training_data(ctx, self.data.as_deref())?;
        let model_dir = ctx
            .env
            .resolve_model(&self.model, SENTENCE_TRANSFORMER_FILES)?;
        let selected = device::select(ctx.env.recipe.accelerator).map_err(io::model_error)?;
        let encoder =
            SentenceEncoder::load(&model_dir, &selected.device).map_err(io::model_error)?;
        let base_length = encoder.max_seq_length();
        let max_seq_length = self
            .params
            .max_seq_length
            .unwrap_or(encoder.max_seq_length());
        let mut tokenized = self.tokenize(&encoder, &examples, max_seq_length)?;
        self.teach(ctx, &examples, &mut tokenized)?;
        ctx.check_cancelled()?;
        let second_round = match self.data {
            Some(_) => None,
            None => SecondRound::read(ctx.input(Artifact::TrainingData)?)?,
        };
        let only_round = RoundFiles {
            journal: ctx.journal_dir.clone(),
            log: ctx.out_dir.join(TRAIN_LOG_FILE),
            name: "",
        };
        let (encoder, tokenized, outcome) = match second_round {
            None => {
                let outcome = self.steps(
                    ctx,
                    &encoder,
                    &model_dir,
                    &selected,
                    &tokenized,
                    &only_round,
                )?;
                (encoder, tokenized, outcome)
            }
            Some((round, chunks)) => {
                let first_dir = ctx.out_dir.join(FIRST_ROUND_DIR);
                fs_err::create_dir_all(&first_dir)?;
                let first = RoundFiles {
                    log: first_dir.join(TRAIN_LOG_FILE),
                    name: ", round 1 of 2",
                    ..only_round
                };
                let outcome =
                    self.steps(ctx, &encoder, &model_dir, &selected, &tokenized, &first)?;
                let encoder = encoder
                    .with_max_seq_length(max_seq_length)
                    .map_err(io::model_error)?;
                let figures = TrainFigures::new(&tokenized, &outcome, &selected, None, None);
                self.save(
                    ctx,
                    &encoder,
                    &model_dir,
                    &first_dir,
                    data_hash.clone(),
                    &figures,
                )?;
                let again = round.mine_again(ctx, &encoder, &chunks, &examples)?;
                io::write_jsonl(&first_dir.join(SECOND_ROUND_TRAIN_FILE), &again)?;
                drop(encoder);
                ctx.check_cancelled()?;
                let base =
                    SentenceEncoder::load(&model_dir, &selected.device).map_err(io::model_error)?;
                let mut tokenized = self.tokenize(&base, &again, max_seq_length)?;
                self.teach(ctx, &again, &mut tokenized)?;
                let second = RoundFiles {
                    journal: ctx.journal_dir.join("round-2"),
                    log: ctx.out_dir.join(TRAIN_LOG_FILE),
                    name: ", round 2 of 2 (from the base, on the second round's negatives)",
                };
                let outcome = self.steps(ctx, &base, &model_dir, &selected, &tokenized, &second)?;
                (base, tokenized, outcome)
            }
        };
        if outcome.resumed_from.is_none() && selected.device.is_cpu() {
            self.record_speed(ctx, &tokenized, &outcome, max_seq_length);
        }
        if let Some(step) = outcome.resumed_from {
            ctx.info(format!("resumed from the checkpoint at step {step}"));
        }
        let encoder = encoder
            .with_max_seq_length(max_seq_length)
            .map_err(io::model_error)?;
        let heldout = self.heldout(ctx)?;
        let merge = self.merge(
            ctx,
            &encoder,
            &model_dir,
            &selected.device,
            heldout.as_ref(),
        )?;
        if let Some(merge) = &merge {
            io::write_json(&ctx.out_dir.join(MERGE_FILE), merge)?;
        }
        let (encoder, length) = self.save_length(ctx, encoder, base_length, heldout.as_ref())?;
        let figures = TrainFigures::new(&tokenized, &outcome, &selected, merge, length);
        self.save(ctx, &encoder, &model_dir, &ctx.out_dir, data_hash, &figures)?;
        ctx.table(&figures.table());
        Ok(StageOutcome {
            summary: serde_json::to_value(&figures)?,
        })
    }
}

/// Where a training round keeps its checkpoints and its step log, and how the run names it.
struct RoundFiles {
    journal: PathBuf,
    log: PathBuf,
    name: &'static str,
}

/// What a training run did, once: the stage's summary (in the lock, reproducible parts only)
/// and the table the run shows.
#[derive(Debug, Serialize)]
struct TrainFigures {
    examples: usize,
    steps: u64,
    first_loss: Option<f64>,
    final_loss: Option<f64>,
    train_seconds: f64,
    peak_rss_bytes: Option<u64>,
    device: String,
    resumed_from: Option<u64>,
    /// The merge the model was saved with; the summary keeps its α.
    #[serde(rename = "merge_alpha", serialize_with = "merge_alpha")]
    merge: Option<MergeSearch>,
    /// The length the model embeds at, when `train.save_length` moved it off the training
    /// length or chose between the two.
    #[serde(rename = "save_length")]
    length: Option<LengthChoice>,
}

fn merge_alpha<S: serde::Serializer>(
    merge: &Option<MergeSearch>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    merge.as_ref().map(|m| m.alpha).serialize(serializer)
}

impl TrainFigures {
    fn new(
        tokenized: &[TokenizedExample],
        outcome: &TrainOutcome,
        selected: &device::SelectedDevice,
        merge: Option<MergeSearch>,
        length: Option<LengthChoice>,
    ) -> Self {
        Self {
            examples: tokenized.len(),
            steps: outcome.total_steps,
            first_loss: outcome.log.first().map(|r| r.loss),
            final_loss: outcome.final_loss(),
            train_seconds: outcome.train_seconds,
            peak_rss_bytes: outcome.peak_rss_bytes,
            device: selected.description.clone(),
            resumed_from: outcome.resumed_from,
            merge,
            length,
        }
    }

    fn table(&self) -> Table {
        let figure = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
        let row = |name: &str, value: String| vec![name.to_owned(), value];
        Table {
            title: "training".to_owned(),
            columns: vec![String::new(), "value".to_owned()],
            rows: vec![
                row("examples", self.examples.to_string()),
                row("steps", self.steps.to_string()),
                row("first loss", figure(self.first_loss)),
                row("final loss", figure(self.final_loss)),
                row("seconds", format!("{:.1}", self.train_seconds)),
                row(
                    "peak memory",
                    self.peak_rss_bytes.map_or_else(
                        || "-".to_owned(),
                        |b| format!("{:.0} MiB", b as f64 / (1024. * 1024.)),
                    ),
                ),
            ],
        }
    }
}

impl Train {
    /// Saves `encoder` (trained from the base in `base_dir`) as a sentence-transformers folder
    /// `model/` in `dir`, with its training metadata and model card.
    fn save(
        &self,
        ctx: &StageContext,
        encoder: &SentenceEncoder,
        base_dir: &Path,
        dir: &Path,
        data_hash: String,
        figures: &TrainFigures,
    ) -> Result<(), StageError> {
        let mut extra = io::run_provenance(ctx);
        extra.insert("resumed_from".to_owned(), figures.resumed_from.into());
        if let Some(merge) = &figures.merge {
            extra.insert("merge".to_owned(), serde_json::to_value(merge)?);
        }
        if let Some(length) = &figures.length {
            extra.insert("save_length".to_owned(), serde_json::to_value(length)?);
        }
        let metadata = TrainingMetadata {
            base_model: self.model.clone(),
            data_hash,
            examples: figures.examples,
            loss: self.config.loss.name(),
            matryoshka_dims: self.config.loss.matryoshka_dims.clone(),
            hyperparameters: self.params(),
            steps: figures.steps,
            final_loss: figures.final_loss,
            train_seconds: figures.train_seconds,
            peak_rss_bytes: figures.peak_rss_bytes,
            device: figures.device.clone(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            extra,
        };
        save_model(
            encoder.bert(),
            encoder.pooling(),
            base_dir,
            encoder.max_seq_length(),
            &dir.join(MODEL_DIR),
            &metadata,
            Some(&ctx.recipe_text),
        )
        .map_err(train_error)
    }

    /// The optimiser steps (resuming from the journal's checkpoint), with the base as the guide
    /// when `train.guide: base`; the per-step log grows in the artifact as training goes.
    fn steps(
        &self,
        ctx: &StageContext,
        encoder: &SentenceEncoder,
        model_dir: &Path,
        selected: &device::SelectedDevice,
        tokenized: &[TokenizedExample],
        round: &RoundFiles,
    ) -> Result<TrainOutcome, StageError> {
        let model = TrainModel {
            bert: encoder.bert(),
            pooling: encoder.pooling(),
        };
        let guide = match self.params.guide {
            GuideSetting::Base => {
                Some(SentenceEncoder::load(model_dir, &selected.device).map_err(io::model_error)?)
            }
            GuideSetting::None => None,
        };
        let mut trainer = Trainer::new(model, self.config.clone()).map_err(train_error)?;
        if let Some(guide) = &guide {
            trainer = trainer
                .with_guide(TrainModel {
                    bert: guide.bert(),
                    pooling: guide.pooling(),
                })
                .map_err(train_error)?;
        }
        let total = trainer.total_steps(tokenized).map_err(train_error)?;
        let gradcache = if self.config.batch_size > self.config.mini_batch_size {
            format!(
                ", GradCache over mini-batches of {}",
                self.config.mini_batch_size
            )
        } else {
            String::new()
        };
        ctx.info(format!(
            "training `{}` on {}{}: {} examples, {total} steps of {}{gradcache}",
            self.model,
            selected.description,
            round.name,
            tokenized.len(),
            self.config.batch_size
        ));
        let bar = ctx.progress("training", Some(total));
        // The log grows a line per step as training goes (to follow with `tail -f`); the
        // complete log, steps before a resume included, replaces it at the end.
        let mut live_log = io::LiveLog::create(&round.log)?;
        let outcome = trainer.run(tokenized, Some(round.journal.as_path()), &mut |record| {
            live_log.append(record);
            bar.set_with_message(
                record.step,
                &format!(
                    "loss {:.4} lr {:.1e} {:.1} ex/s",
                    record.loss, record.lr, record.examples_per_s
                ),
            );
            if ctx.check_cancelled().is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        drop(bar);
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(TrainError::Stopped { .. }) => return Err(StageError::Cancelled),
            Err(error) => return Err(train_error(error)),
        };
        live_log.finish()?;
        io::write_jsonl(&round.log, &outcome.log)?;
        Ok(outcome)
    }

    /// Keeps what this run measured of training speed and memory, for later estimates.
    fn record_speed(
        &self,
        ctx: &StageContext,
        tokenized: &[TokenizedExample],
        outcome: &TrainOutcome,
        max_seq_length: usize,
    ) {
        let negatives = tokenized.iter().map(|e| e.negatives.len()).sum::<usize>() as f64
            / tokenized.len().max(1) as f64;
        let trained = (outcome.total_steps as f64 * self.config.batch_size as f64)
            .min(tokenized.len() as f64 * self.params.epochs as f64);
        let texts = trained * (texts_per_example(0) + negatives);
        let positive_tokens =
            tokenized.iter().map(|e| e.positive.len()).sum::<usize>() / tokenized.len().max(1);
        // Per text at full length, as estimates scale it.
        let padded = padded_tokens(max_seq_length, Some(positive_tokens as u64));
        if texts > 0. && padded > 0 {
            Speeds::open(&ctx.env.hub.cache_dir).record_training(
                &self.model,
                max_seq_length,
                self.config.mini_batch_size.min(self.config.batch_size),
                outcome.train_seconds / texts * max_seq_length as f64 / padded as f64,
                outcome.peak_rss_bytes,
            );
        }
    }

    /// Mine's held-out split as a retrieval set, read once for the merge and the saved length
    /// where either scores on it; `None` where neither does, with a `data` file, or an empty
    /// split.
    fn heldout(&self, ctx: &StageContext) -> Result<Option<RetrievalSet>, StageError> {
        let merges = self.params.merge != MergeSetting::Named(MergeMode::None);
        let chooses_length = self.params.save_length == SaveLength::Auto;
        if self.data.is_some() || !(merges || chooses_length) {
            return Ok(None);
        }
        heldout_set(ctx.input(Artifact::TrainingData)?)
    }

    /// Merges the trained weights of `encoder` with the base in `base_dir` as `merge` says,
    /// leaving the chosen mix in `encoder`; what was tried and why, or `None` for `merge: none`.
    fn merge(
        &self,
        ctx: &StageContext,
        encoder: &SentenceEncoder,
        base_dir: &Path,
        device: &candle_core::Device,
        heldout: Option<&RetrievalSet>,
    ) -> Result<Option<MergeSearch>, StageError> {
        let (alphas, mode): (Vec<f64>, &str) = match self.params.merge {
            MergeSetting::Named(MergeMode::None) => return Ok(None),
            MergeSetting::Named(MergeMode::Auto) => (MERGE_ALPHAS.to_vec(), "auto"),
            MergeSetting::Alpha(alpha) => (vec![alpha], "fixed"),
        };
        let general = RetrievalSet::general()?;
        let base = SentenceEncoder::load(base_dir, device).map_err(io::model_error)?;
        let mix = Interpolation::new(&encoder.bert().named_vars(), &base.bert().named_vars())
            .map_err(io::model_error)?;
        drop(base);
        let bar = ctx.progress("merging with the base", Some(alphas.len() as u64 * 2));
        // The general check is small: every α first, so the guard is known before the held-out
        // split's costlier scoring, which skips the α the guard rules out.
        let mut general_ndcg10 = Vec::with_capacity(alphas.len());
        for &alpha in &alphas {
            ctx.check_cancelled()?;
            mix.apply(alpha).map_err(io::model_error)?;
            general_ndcg10.push(general.ndcg10(encoder)?);
            bar.inc(1);
        }
        let guarded = within_general_guard(&alphas, &general_ndcg10, self.params.general_max_drop);
        let heldout_ndcg10 = match heldout {
            Some(set) => scored_until_fall(&alphas, &guarded, |alpha| {
                ctx.check_cancelled()?;
                mix.apply(alpha).map_err(io::model_error)?;
                let ndcg10 = set.ndcg10(encoder)?;
                bar.inc(1);
                Ok(ndcg10)
            })?,
            None => vec![None; alphas.len()],
        };
        bar.set(alphas.len() as u64 * 2);
        drop(bar);
        let scored: Vec<(f64, Option<f64>, f64)> = alphas
            .iter()
            .zip(heldout_ndcg10)
            .zip(general_ndcg10)
            .map(|((&alpha, heldout), general)| (alpha, heldout, general))
            .collect();
        let (alpha, why, trials) = choose_alpha(&scored, self.params.general_max_drop);
        let search = MergeSearch {
            alpha,
            mode: mode.to_owned(),
            why: if mode == "fixed" {
                "`train.merge` fixes it".to_owned()
            } else {
                why
            },
            trials,
        };
        mix.apply(alpha).map_err(io::model_error)?;
        let figure = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
        ctx.table(&Table {
            title: format!("merge with the base: α = {alpha} ({})", search.why),
            columns: ["α", "held-out nDCG@10", "general nDCG@10", "general guard"]
                .map(str::to_owned)
                .to_vec(),
            rows: search
                .trials
                .iter()
                .map(|t| {
                    vec![
                        t.alpha.to_string(),
                        figure(t.heldout_ndcg10),
                        format!("{:.4}", t.general_ndcg10),
                        if t.within_general_guard { "ok" } else { "lost" }.to_owned(),
                    ]
                })
                .collect(),
        });
        if heldout.is_none() && mode == "auto" {
            ctx.warn(
                "no held-out split to choose the merge on: kept the largest α the general check allows",
            );
        }
        Ok(Some(search))
    }

    /// `encoder` (at its training length) set to embed at the length `train.save_length` asks
    /// for: the training length, the base's `base_length`, or the base's only where the held-out
    /// split finds it better beyond noise (else the training length: it embeds faster).
    fn save_length(
        &self,
        ctx: &StageContext,
        encoder: SentenceEncoder,
        base_length: usize,
        heldout: Option<&RetrievalSet>,
    ) -> Result<(SentenceEncoder, Option<LengthChoice>), StageError> {
        let trained = encoder.max_seq_length();
        if trained == base_length {
            return Ok((encoder, None));
        }
        let at = |encoder: SentenceEncoder, tokens: usize| {
            encoder.with_max_seq_length(tokens).map_err(io::model_error)
        };
        match self.params.save_length {
            SaveLength::Training => return Ok((encoder, None)),
            SaveLength::Base => {
                let choice = LengthChoice {
                    tokens: base_length,
                    why: "`train.save_length: base`".to_owned(),
                    trials: Vec::new(),
                };
                return Ok((at(encoder, base_length)?, Some(choice)));
            }
            SaveLength::Auto => {}
        }
        let Some(heldout) = heldout else {
            ctx.warn(format!(
                "no held-out split to choose the saved length on: the model embeds at its \
                 training length, {trained} tokens"
            ));
            return Ok((encoder, None));
        };
        let bar = ctx.progress("choosing the saved length", Some(2));
        let at_trained = heldout.ndcg10_per_query(&encoder)?;
        bar.set(1);
        ctx.check_cancelled()?;
        let longer = at(encoder, base_length)?;
        let at_base = heldout.ndcg10_per_query(&longer)?;
        drop(bar);
        let comparison = compare_paired(&at_trained, &at_base, &PairedTestConfig::default())
            .map_err(StageError::engine)?;
        let why = format!(
            "{base_length} against {trained} tokens on the held-out split: {:+.4} (95% CI {:+.4} to {:+.4}, {})",
            comparison.mean_difference,
            comparison.interval.low,
            comparison.interval.high,
            format_p(comparison.permutation.p_value),
        );
        let (tokens, encoder) = if comparison.verdict == Verdict::Better {
            (base_length, longer)
        } else {
            (trained, at(longer, trained)?)
        };
        let choice = LengthChoice {
            tokens,
            why,
            trials: vec![
                (trained, comparison.baseline_mean),
                (base_length, comparison.candidate_mean),
            ],
        };
        ctx.table(&Table {
            title: format!("saved length: {tokens} tokens ({})", choice.why),
            columns: ["tokens", "held-out nDCG@10"].map(str::to_owned).to_vec(),
            rows: choice
                .trials
                .iter()
                .map(|(tokens, ndcg)| vec![tokens.to_string(), format!("{ndcg:.4}")])
                .collect(),
        });
        Ok((encoder, Some(choice)))
    }

    /// Token ids of every query, positive and (with `hard_negatives`) negative, truncated at
    /// `max_seq_length` as the tokenizer truncates: the closing special token is kept.
    fn tokenize(
        &self,
        encoder: &SentenceEncoder,
        examples: &[TrainingExample],
        max_seq_length: usize,
    ) -> Result<Vec<TokenizedExample>, StageError> {
        // Queries and passages apart: each role gets the model's prompt for it.
        let queries: Vec<&str> = examples.iter().map(|e| e.query.as_str()).collect();
        let mut passages: Vec<&str> = Vec::new();
        for example in examples {
            passages.push(&example.positive);
            if self.params.hard_negatives {
                passages.extend(example.negatives.iter().map(|n| n.text.as_str()));
            }
            passages.extend(example.extra_positives.iter().map(|p| p.text.as_str()));
        }
        let tokenizer = encoder.sentence_tokenizer();
        let tokenize = |texts: &[&str], role| {
            tokenizer
                .token_ids_as(texts, role)
                .map(|ids| ids.into_iter().map(|row| truncate(row, max_seq_length)))
                .map_err(io::model_error)
        };
        let mut queries = tokenize(&queries, TextRole::Query)?;
        let mut passages = tokenize(&passages, TextRole::Passage)?;
        let mut next = || passages.next().unwrap_or_default();
        Ok(examples
            .iter()
            .map(|example| TokenizedExample {
                anchor: queries.next().unwrap_or_default(),
                positive: next(),
                positive_id: example.positive_id.clone(),
                negatives: if self.params.hard_negatives {
                    example
                        .negatives
                        .iter()
                        .map(|n| TokenizedText {
                            id: n.id.clone(),
                            ids: next(),
                        })
                        .collect()
                } else {
                    Vec::new()
                },
                extra_positives: example
                    .extra_positives
                    .iter()
                    .map(|p| TokenizedText {
                        id: p.id.clone(),
                        ids: next(),
                    })
                    .collect(),
                teacher_margins: Vec::new(),
            })
            .collect())
    }

    /// With `distill`, the teacher's margin (its logit for the positive minus that for the
    /// negative) for every negative of every example, into `tokenized` (made from `examples`).
    fn teach(
        &self,
        ctx: &StageContext,
        examples: &[TrainingExample],
        tokenized: &mut [TokenizedExample],
    ) -> Result<(), StageError> {
        let Some(distill) = &self.params.distill else {
            return Ok(());
        };
        let teacher = io::load_cross_encoder(&ctx.env, &distill.teacher)?;
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for example in examples {
            pairs.push((&example.query, &example.positive));
            pairs.extend(
                example
                    .negatives
                    .iter()
                    .map(|n| (example.query.as_str(), n.text.as_str())),
            );
        }
        let bar = ctx.progress("the teacher's scores", Some(pairs.len() as u64));
        let logits = teacher
            .score(&pairs, TEACHER_BATCH, &mut |n| bar.set(n as u64))
            .map_err(io::model_error)?;
        drop(bar);
        let mut logits = logits.into_iter();
        for (example, tokenized) in examples.iter().zip(tokenized) {
            let positive = logits.next().unwrap_or_default();
            tokenized.teacher_margins = (&mut logits)
                .take(example.negatives.len())
                .map(|negative| positive - negative)
                .collect();
        }
        ctx.info(format!(
            "the teacher `{}` scored {} pairs for MarginMSE",
            distill.teacher,
            pairs.len()
        ));
        Ok(())
    }
}

/// Whether each α (with its general-check nDCG@10) loses at most `max_drop` against the base:
/// α = 0, or the smallest α tried.
fn within_general_guard(alphas: &[f64], general_ndcg10: &[f64], max_drop: f64) -> Vec<bool> {
    let base_general = alphas
        .iter()
        .zip(general_ndcg10)
        .min_by(|a, b| a.0.total_cmp(b.0))
        .map_or(0.0, |(_, &g)| g);
    general_ndcg10
        .iter()
        // A hair of tolerance: the base against itself never fails on rounding.
        .map(|&g| g >= base_general - max_drop - 1e-12)
        .collect()
}

/// The held-out nDCG@10 `score` gives each α the guard allows, in order, until one scores
/// below the best before it; `None` for the rest. It takes the held-out score along the line
/// from the fine-tuned weights to the base to have one peak (every pyfaq run measured falls from
/// α = 1), so the α past a fall would not win, and each costs an encoding of the held-out corpus.
fn scored_until_fall(
    alphas: &[f64],
    guarded: &[bool],
    mut score: impl FnMut(f64) -> Result<f64, StageError>,
) -> Result<Vec<Option<f64>>, StageError> {
    let mut best: Option<f64> = None;
    let mut fallen = false;
    let mut scores = Vec::with_capacity(alphas.len());
    for (&alpha, &allowed) in alphas.iter().zip(guarded) {
        if !allowed || fallen {
            scores.push(None);
            continue;
        }
        let ndcg10 = score(alpha)?;
        fallen = best.is_some_and(|b| ndcg10 < b);
        best = Some(best.map_or(ndcg10, |b| b.max(ndcg10)));
        scores.push(Some(ndcg10));
    }
    Ok(scores)
}

/// The α to keep from `(α, held-out nDCG@10, general nDCG@10)` triples, why, and the trials
/// with their guard: among the α within the general check's guard, the best on the held-out
/// split, the smaller α on a tie (an α left unscored on the held-out split is not a candidate);
/// without held-out figures, the largest α the guard allows.
fn choose_alpha(
    scored: &[(f64, Option<f64>, f64)],
    max_drop: f64,
) -> (f64, String, Vec<MergeTrial>) {
    let alphas: Vec<f64> = scored.iter().map(|t| t.0).collect();
    let general: Vec<f64> = scored.iter().map(|t| t.2).collect();
    let guarded = within_general_guard(&alphas, &general, max_drop);
    let trials: Vec<MergeTrial> = scored
        .iter()
        .zip(guarded)
        .map(
            |(&(alpha, heldout_ndcg10, general_ndcg10), within_general_guard)| MergeTrial {
                alpha,
                heldout_ndcg10,
                general_ndcg10,
                within_general_guard,
            },
        )
        .collect();
    let blind = trials.iter().all(|t| t.heldout_ndcg10.is_none());
    let allowed = trials
        .iter()
        .filter(|t| t.within_general_guard && (blind || t.heldout_ndcg10.is_some()));
    let best = allowed.max_by(|a, b| {
        let key = |t: &MergeTrial| t.heldout_ndcg10.unwrap_or(t.alpha);
        key(a).total_cmp(&key(b)).then(b.alpha.total_cmp(&a.alpha))
    });
    let Some(best) = best else {
        return (0.0, "no α passed the general check".to_owned(), trials);
    };
    let unscored = trials
        .iter()
        .any(|t| t.within_general_guard && t.heldout_ndcg10.is_none());
    let why = match best.heldout_ndcg10 {
        Some(ndcg) if unscored => format!(
            "best held-out nDCG@10 ({ndcg:.4}) of the α within {max_drop} of the base on the \
             general check; held-out fell past it, so smaller α were not scored"
        ),
        Some(ndcg) => format!(
            "best held-out nDCG@10 ({ndcg:.4}) of the α within {max_drop} of the base on the general check"
        ),
        None => format!("the largest α within {max_drop} of the base on the general check"),
    };
    (best.alpha, why, trials)
}

/// Documents, queries and their relevant documents, to score a merge on.
struct RetrievalSet {
    documents: Vec<(String, String)>,
    queries: Vec<(String, String)>,
    relevant: std::collections::HashMap<String, std::collections::HashSet<String>>,
}

impl RetrievalSet {
    /// The general check built into the tool.
    fn general() -> Result<Self, StageError> {
        let data = eval::general::general_check().map_err(StageError::engine)?;
        Ok(Self {
            documents: data
                .documents
                .into_iter()
                .map(|doc| (doc.id, io::passage_of(&doc.title, &doc.text)))
                .collect(),
            queries: data.queries,
            relevant: data.relevant,
        })
    }

    /// Mean nDCG@10 of `encoder` over the queries.
    fn ndcg10(&self, encoder: &SentenceEncoder) -> Result<f64, StageError> {
        let scores = self.ndcg10_per_query(encoder)?;
        Ok(scores.iter().sum::<f64>() / scores.len().max(1) as f64)
    }

    /// nDCG@10 of `encoder` on each query with a right answer, in the queries' order.
    fn ndcg10_per_query(&self, encoder: &SentenceEncoder) -> Result<Vec<f64>, StageError> {
        let texts = |pairs: &[(String, String)]| -> Result<Vec<f32>, StageError> {
            let texts: Vec<&str> = pairs.iter().map(|(_, t)| t.as_str()).collect();
            let embeddings = encoder
                .encode(&texts, MERGE_ENCODE_BATCH, &mut |_| {})
                .map_err(io::model_error)?;
            truncate_and_normalize(embeddings.as_slice(), encoder.dim(), encoder.dim())
                .map_err(io::index_error)
        };
        let index =
            DenseIndex::new(encoder.dim(), texts(&self.documents)?).map_err(io::index_error)?;
        let hits = index
            .search_batch(&texts(&self.queries)?, 10, &|_| {})
            .map_err(io::index_error)?;
        let ranked: Vec<Vec<String>> = hits
            .into_iter()
            .map(|hits| {
                hits.into_iter()
                    .map(|hit| self.documents[hit.doc].0.clone())
                    .collect()
            })
            .collect();
        let empty = std::collections::HashSet::new();
        let mut scores = RunScores::evaluate(
            self.queries.iter().zip(&ranked).map(|((id, _), ranked)| {
                (
                    id.as_str(),
                    ranked.as_slice(),
                    self.relevant.get(id).unwrap_or(&empty),
                )
            }),
            &[Metric::NDCG_10],
        );
        Ok(scores.values.remove(&Metric::NDCG_10).unwrap_or_default())
    }
}

/// The held-out queries of mine's split in `data`, against their own passages and negatives
/// and then training positives up to [`MERGE_CORPUS_LIMIT`]; `None` when the split is empty.
fn heldout_set(data: &Path) -> Result<Option<RetrievalSet>, StageError> {
    let heldout: Vec<TrainingExample> = io::read_jsonl(&data.join(HELDOUT_FILE))?;
    if heldout.is_empty() {
        return Ok(None);
    }
    let train: Vec<TrainingExample> = io::read_jsonl(&data.join(TRAIN_FILE))?;
    let mut seen = std::collections::HashSet::new();
    let mut documents = Vec::new();
    // Every right answer is in, whatever the limit; negatives, then distractors, fill up to it.
    for example in &heldout {
        if seen.insert(example.positive_id.clone()) {
            documents.push((example.positive_id.clone(), example.positive.clone()));
        }
        for extra in &example.extra_positives {
            if seen.insert(extra.id.clone()) {
                documents.push((extra.id.clone(), extra.text.clone()));
            }
        }
    }
    let others = heldout
        .iter()
        .flat_map(|e| e.negatives.iter().map(|n| (&n.id, &n.text)))
        .chain(train.iter().map(|e| (&e.positive_id, &e.positive)));
    for (id, text) in others {
        if documents.len() >= MERGE_CORPUS_LIMIT {
            break;
        }
        if seen.insert(id.clone()) {
            documents.push((id.clone(), text.clone()));
        }
    }
    let mut queries = Vec::new();
    let mut relevant = std::collections::HashMap::new();
    for (index, example) in heldout.into_iter().enumerate() {
        let id = format!("heldout-{index}");
        relevant.insert(id.clone(), example.answer_ids());
        queries.push((id, example.query));
    }
    Ok(Some(RetrievalSet {
        documents,
        queries,
        relevant,
    }))
}

/// Rows of a training file that cannot train anything, counted for a warning.
#[derive(Debug, Default, PartialEq, Eq)]
struct DroppedRows {
    /// Rows with an empty (or blank) query or positive.
    empty: usize,
    /// Rows repeating an earlier row's query and positive: a repeat only weighs that pair twice
    /// and, in one batch, makes the copy a wrong answer to its twin.
    duplicate: usize,
}

impl DroppedRows {
    fn warning(&self, path: &Path) -> Option<String> {
        let mut parts = Vec::new();
        if self.empty > 0 {
            parts.push(format!("{} with an empty query or positive", self.empty));
        }
        if self.duplicate > 0 {
            parts.push(format!("{} repeating an earlier row", self.duplicate));
        }
        (!parts.is_empty()).then(|| {
            format!(
                "`{}`: skipped {} rows ({})",
                path.display(),
                self.empty + self.duplicate,
                parts.join(", ")
            )
        })
    }
}

/// The examples without empty rows and repeats of an earlier (query, positive) pair, in order.
fn without_unusable_rows(examples: Vec<TrainingExample>) -> (Vec<TrainingExample>, DroppedRows) {
    let mut dropped = DroppedRows::default();
    let mut seen = std::collections::HashSet::new();
    let mut kept = Vec::with_capacity(examples.len());
    for example in examples {
        if example.blank_field().is_some() {
            dropped.empty += 1;
        } else if !seen.insert(example.pair()) {
            dropped.duplicate += 1;
        } else {
            kept.push(example);
        }
    }
    (kept, dropped)
}

/// Cuts `ids` to `max` tokens, keeping the last (the closing special token).
fn truncate(mut ids: Vec<u32>, max: usize) -> Vec<u32> {
    if ids.len() > max
        && let Some(&last) = ids.last()
    {
        ids.truncate(max - 1);
        ids.push(last);
    }
    ids
}

/// Refuses a negative or non-finite `weight_decay`.
pub(super) fn check_weight_decay(weight_decay: f64, invalid: &mut Vec<Invalid>) {
    if !(weight_decay.is_finite() && weight_decay >= 0.) {
        invalid.push(Invalid::new(&["weight_decay"], "must be zero or positive"));
    }
}

/// A `data` key resolved against the recipe's folder; a path that is no file is refused.
pub(super) fn data_file(
    data: Option<&str>,
    env: &RecipeEnv,
    invalid: &mut Vec<Invalid>,
) -> Option<PathBuf> {
    let path = env.dir.join(data?);
    if !path.is_file() {
        invalid.push(
            Invalid::new(&["data"], format!("`{}` is not a file", path.display()))
                .with_help("paths are relative to the recipe's folder"),
        );
    }
    Some(path)
}

/// A training stage's parameters as hashed: without `data` (the file's bytes enter the key
/// through [`model_and_data_externals`]), with the resolved model and the seed.
pub(super) fn keyed_params(
    mut params: serde_json::Value,
    model: &str,
    seed: u64,
) -> serde_json::Value {
    if let Some(map) = params.as_object_mut() {
        map.remove("data");
        map.insert("model".to_owned(), model.into());
        map.insert("seed".to_owned(), seed.into());
    }
    params
}

/// The model a training stage starts from and, when given, its `data` file.
pub(super) fn model_and_data_externals(
    env: &StageEnv,
    model: &str,
    data: Option<&Path>,
) -> Result<Vec<External>, StageError> {
    let path = env.resolve_model(model, SENTENCE_TRANSFORMER_FILES)?;
    let mut externals = vec![External::Model {
        label: "model".to_owned(),
        reference: model.to_owned(),
        path,
    }];
    if let Some(data) = data {
        let (root, file) = split_file(data);
        externals.push(External::Files {
            label: "data".to_owned(),
            root,
            files: vec![file],
        });
    }
    Ok(externals)
}

/// The training examples (the `data` file, else mine's `train.jsonl`), never none, and the
/// blake3 of their file.
pub(super) fn read_training_data(
    ctx: &StageContext,
    data: Option<&Path>,
) -> Result<(Vec<TrainingExample>, String), StageError> {
    let data_path = match data {
        Some(path) => path.to_owned(),
        None => ctx.input(Artifact::TrainingData)?.join(TRAIN_FILE),
    };
    let examples: Vec<TrainingExample> = io::read_jsonl(&data_path)?;
    let (examples, dropped) = without_unusable_rows(examples);
    if let Some(warning) = dropped.warning(&data_path) {
        ctx.warn(warning);
    }
    if examples.is_empty() {
        return Err(StageError::Failed(format!(
            "`{}` holds no training examples",
            data_path.display()
        )));
    }
    let data_hash = blake3::hash(&fs_err::read(&data_path)?)
        .to_hex()
        .to_string();
    Ok((examples, data_hash))
}

fn split_file(path: &Path) -> (PathBuf, PathBuf) {
    let root = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = path
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| path.to_path_buf());
    (root, file)
}

pub(super) fn train_error(error: TrainError) -> StageError {
    StageError::engine(error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::device::Accelerator;

    fn env(dir: &Path) -> RecipeEnv {
        RecipeEnv {
            dir: dir.to_owned(),
            name: "t".to_owned(),
            base_model: "sentence-transformers/all-MiniLM-L6-v2".to_owned(),
            seed: 3,
            accelerator: Accelerator::Cpu,
            encode_precision: Default::default(),
        }
    }

    fn build(yaml: &str, dir: &Path) -> Result<Train, Vec<Invalid>> {
        let params: TrainParams = serde_yaml::from_str(yaml).expect("parses");
        Train::new(params, &env(dir))
    }

    #[test]
    fn defaults_read_from_mine_and_data_replaces_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stage = build("{}", dir.path()).expect("defaults are valid");
        assert_eq!(stage.inputs()[0].artifact, Artifact::TrainingData);
        assert_eq!(stage.inputs()[0].instead, Some("data"));
        let params = stage.params();
        assert_eq!(params["batch_size"], 32);
        assert_eq!(params["learning_rate"], 2e-5);
        assert_eq!(params["model"], "sentence-transformers/all-MiniLM-L6-v2");
        assert_eq!(params["seed"], 3);

        std::fs::write(dir.path().join("train.jsonl"), "").expect("write");
        let stage = build("data: train.jsonl", dir.path()).expect("valid");
        assert!(stage.inputs().is_empty());
        assert!(stage.params().get("data").is_none());
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (yaml, key) in [
            ("batch_size: 1", "batch_size"),
            ("learning_rate: 0", "learning_rate"),
            ("warmup_ratio: 1.5", "warmup_ratio"),
            ("matryoshka_dims: [0]", "matryoshka_dims"),
            ("max_seq_length: 1", "max_seq_length"),
            ("checkpoint_every: 0", "checkpoint_every"),
            ("data: missing.jsonl", "data"),
            ("weight_decay: -1", "weight_decay"),
            ("batch_size: 1000000000000", "batch_size"),
            ("batch_size: 18446744073709551615", "batch_size"),
            ("mini_batch_size: 1000000000000", "mini_batch_size"),
        ] {
            let problems = build(yaml, dir.path()).err().unwrap_or_default();
            assert!(
                problems.iter().any(|p| p.path == [key]),
                "`{yaml}` should be refused at `{key}`: {problems:?}"
            );
        }
        let error = serde_yaml::from_str::<TrainParams>("epochz: 2").expect_err("unknown key");
        assert!(error.to_string().contains("epochz"), "{error}");
    }

    #[test]
    fn r18_16_empty_and_duplicate_training_rows_are_counted_and_skipped() {
        let row = |query: &str, positive: &str| TrainingExample {
            query: query.to_owned(),
            positive: positive.to_owned(),
            positive_id: positive.to_owned(),
            negatives: Vec::new(),
            extra_positives: Vec::new(),
            source_document: "d".to_owned(),
        };
        let rows = vec![
            row("q1", "p1"),
            row("", "p2"),
            row("q1", "p1"),
            row("q2", "  "),
            row("q1", "p2"),
            row("q1", "p1"),
        ];
        let (kept, dropped) = without_unusable_rows(rows);
        let pairs: Vec<(&str, &str)> = kept
            .iter()
            .map(|e| (e.query.as_str(), e.positive.as_str()))
            .collect();
        assert_eq!(pairs, [("q1", "p1"), ("q1", "p2")]);
        assert_eq!(
            dropped,
            DroppedRows {
                empty: 2,
                duplicate: 2
            }
        );
        assert_eq!(
            dropped.warning(Path::new("t.jsonl")).as_deref(),
            Some(
                "`t.jsonl`: skipped 4 rows (2 with an empty query or positive, 2 repeating an earlier row)"
            )
        );
        assert_eq!(DroppedRows::default().warning(Path::new("t.jsonl")), None);
    }

    #[test]
    fn merge_reads_auto_none_or_an_alpha_and_refuses_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (yaml, merge) in [
            ("{}", MergeSetting::Named(MergeMode::Auto)),
            ("merge: none", MergeSetting::Named(MergeMode::None)),
            ("merge: 0.3", MergeSetting::Alpha(0.3)),
        ] {
            let stage = build(yaml, dir.path()).expect("valid");
            assert_eq!(stage.params.merge, merge, "{yaml}");
        }
        for yaml in ["merge: 1.5", "merge: -0.1"] {
            let problems = build(yaml, dir.path()).err().unwrap_or_default();
            assert!(problems.iter().any(|p| p.path == ["merge"]), "{yaml}");
        }
        assert!(serde_yaml::from_str::<TrainParams>("merge: sometimes").is_err());
    }

    #[test]
    fn the_merge_keeps_the_best_held_out_alpha_the_general_check_allows() {
        let scored = [
            (1.0, Some(0.50), 0.80),
            (0.75, Some(0.55), 0.84),
            (0.5, Some(0.55), 0.86),
            (0.25, Some(0.52), 0.88),
            (0.0, Some(0.45), 0.90),
        ];
        let (alpha, _, trials) = choose_alpha(&scored, 0.02);
        assert_eq!(alpha, 0.25);
        let guarded: Vec<bool> = trials.iter().map(|t| t.within_general_guard).collect();
        assert_eq!(guarded, [false, false, false, true, true]);
        // With room on the general check, the best held-out α; a tie goes to the smaller.
        let (alpha, why, _) = choose_alpha(&scored, 0.1);
        assert_eq!(alpha, 0.5);
        assert!(why.contains("0.5500"), "{why}");
        // An α left unscored past the held-out fall is no candidate, and the why says so.
        let stopped = [
            (1.0, Some(0.50), 0.90),
            (0.5, Some(0.45), 0.90),
            (0.0, None, 0.90),
        ];
        let (alpha, why, _) = choose_alpha(&stopped, 0.02);
        assert_eq!(alpha, 1.0);
        assert!(why.contains("not scored"), "{why}");
        // Without held-out figures, the largest α the guard allows.
        let blind = [(1.0, None, 0.80), (0.5, None, 0.87), (0.0, None, 0.90)];
        assert_eq!(choose_alpha(&blind, 0.2).0, 1.0);
        assert_eq!(choose_alpha(&blind, 0.05).0, 0.5);
    }

    #[test]
    fn the_merge_scores_held_out_until_it_falls_and_skips_what_the_guard_rules_out() {
        let alphas = [1.0, 0.75, 0.5, 0.25, 0.0];
        let mut asked = Vec::new();
        let scores = scored_until_fall(&alphas, &[true; 5], |alpha| {
            asked.push(alpha);
            Ok(1.0 - (alpha - 0.5).abs())
        })
        .expect("scores");
        // Rises to the peak at 0.5, falls at 0.25, and 0 is never scored.
        assert_eq!(asked, [1.0, 0.75, 0.5, 0.25]);
        assert_eq!(scores, [Some(0.5), Some(0.75), Some(1.0), Some(0.75), None]);
        // A tie is no fall; an α the guard rules out is never scored.
        let flat = scored_until_fall(&alphas, &[false, true, true, true, true], |_| Ok(0.6))
            .expect("scores");
        assert_eq!(flat, [None, Some(0.6), Some(0.6), Some(0.6), Some(0.6)]);
        let scored: Vec<_> = alphas
            .iter()
            .zip(&scores)
            .map(|(&a, &h)| (a, h, 1.0))
            .collect();
        assert_eq!(choose_alpha(&scored, 0.02).0, 0.5);
    }

    #[test]
    fn truncation_keeps_the_closing_token() {
        assert_eq!(truncate(vec![101, 5, 6, 7, 102], 4), [101, 5, 6, 102]);
        assert_eq!(truncate(vec![101, 5, 102], 4), [101, 5, 102]);
    }
}
