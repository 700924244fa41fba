//! The train-reranker stage: fine-tunes a cross-encoder on mine's training data (each query with
//! its positive and mined negatives), with binary cross-entropy or the listwise softmax loss and
//! early stopping on the held-out split (see [`crate::model::train::rerank`]).
//!
//! It starts from a cross-encoder folder or hub id, or from a plain BERT encoder (the recipe's
//! `base_model` by default) whose classification head is drawn from the recipe's seed.
//!
//! Early stopping needs negatives for the held-out queries, which mine does not mine: each
//! held-out positive is grouped with the passages BM25 ranks highest for its query (the corpus's
//! chunks when the recipe chunks, else every passage the training data names). The same held-out
//! queries are evaluate's `held-out` set, so the reranker's figure there is chosen on them and
//! optimistic; a labelled dataset in `evaluate.datasets` is the unbiased measure.
//!
//! Output: `reranker/` (a folder sentence-transformers' `CrossEncoder` loads, with its model card
//! and `training_metadata.json`), `train_log.jsonl` (one line per step) and `evals.jsonl` (each
//! held-out scoring).

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::PathBuf;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{self, Estimate, EstimateInput};
use super::io::{self, CHUNKS_FILE, HELDOUT_FILE, RERANKER_DIR, TrainingExample};
use super::train::{
    check_weight_decay, data_file, keyed_params, model_and_data_externals, read_training_data,
    train_error,
};
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::corpus::Chunk;
use crate::index::Bm25Index;
use crate::model::cross_encoder::{CrossEncoder, HeadOrigin, LoadOptions};
use crate::model::device;
use crate::model::hub::SENTENCE_TRANSFORMER_FILES;
use crate::model::train::rerank::{RerankConfig, RerankExample, RerankOutcome, RerankTrainer};
use crate::model::train::rerank_loss::RerankLoss;
use crate::model::train::save::{TrainingMetadata, save_cross_encoder};
use crate::model::train::{AdamWConfig, TrainError};

/// The per-step log and the held-out scorings inside the stage's artifact.
pub const RERANK_LOG_FILE: &str = "train_log.jsonl";
pub const RERANK_EVALS_FILE: &str = "evals.jsonl";

/// The `train_reranker:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TrainRerankerParams {
    /// The model to start from: a cross-encoder (hub id or folder), or a plain BERT encoder whose
    /// classification head is then drawn from the recipe's seed. Default: the recipe's
    /// `base_model`.
    #[serde(default)]
    pub model: Option<String>,
    /// `listwise`: softmax over each query's positive and negatives; `bce`: binary
    /// cross-entropy per (query, passage) pair.
    #[serde(default)]
    pub loss: RerankLoss,
    /// Passes over the training queries.
    #[serde(default = "default_epochs")]
    pub epochs: u64,
    /// Queries per optimiser step; each brings its positive and negatives.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Queries run through the model at once (the batch's gradients are summed over these).
    #[serde(default = "default_mini_batch_size")]
    pub mini_batch_size: usize,
    /// Peak learning rate of AdamW.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Share of the steps over which the learning rate warms up, before decaying linearly.
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// AdamW's decoupled weight decay (not on biases and LayerNorm parameters).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip the gradients' global norm to this; `null` never clips.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Use at most this many of each query's mined negatives; default: all of them.
    #[serde(default)]
    pub negatives_per_query: Option<usize>,
    /// Truncate each (query, passage) pair at this many tokens; default: the model's own limit.
    #[serde(default)]
    pub max_seq_length: Option<usize>,
    /// Stop after this many optimiser steps.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Score the held-out queries every this many steps, keeping the best weights.
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Stop after this many held-out scorings without improvement; `null` never stops early.
    #[serde(default = "default_patience")]
    pub patience: Option<u64>,
    /// Held-out queries scored for early stopping (a seeded sample when there are more).
    #[serde(default = "default_validation_queries")]
    pub validation_queries: usize,
    /// BM25 negatives each held-out positive is ranked against.
    #[serde(default = "default_validation_negatives")]
    pub validation_negatives: usize,
    /// A training-data JSONL file (ragd's format, as mine writes) to train on instead of the
    /// output of a `mine:` section. Relative to the recipe's folder. No held-out split comes
    /// with it, so there is no early stopping.
    #[serde(default)]
    pub data: Option<String>,
}

impl Default for TrainRerankerParams {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

fn default_epochs() -> u64 {
    1
}
fn default_batch_size() -> usize {
    16
}
fn default_mini_batch_size() -> usize {
    8
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
fn default_eval_every() -> u64 {
    50
}
fn default_patience() -> Option<u64> {
    Some(3)
}
fn default_validation_queries() -> usize {
    200
}
fn default_validation_negatives() -> usize {
    7
}

pub struct TrainReranker {
    params: TrainRerankerParams,
    model: String,
    data: Option<PathBuf>,
    seed: u64,
    config: RerankConfig,
}

impl StageDef for TrainReranker {
    const KIND: &'static str = "train-reranker";
    const SECTION: &'static str = "train_reranker";
    const ABOUT: &'static str = "Fine-tune a cross-encoder reranker on the training examples (BCE or listwise loss, early stopping on the held-out split).";
    const PRODUCES: Artifact = Artifact::Reranker;
    type Params = TrainRerankerParams;

    fn new(params: TrainRerankerParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        let config = RerankConfig {
            epochs: params.epochs,
            batch_size: params.batch_size,
            mini_batch_size: params.mini_batch_size,
            learning_rate: params.learning_rate,
            warmup_ratio: params.warmup_ratio,
            adamw: AdamWConfig {
                weight_decay: params.weight_decay,
                ..AdamWConfig::default()
            },
            max_grad_norm: params.max_grad_norm,
            loss: params.loss,
            seed: env.seed,
            dropout: true,
            max_steps: params.max_steps,
            eval_every: Some(params.eval_every),
            patience: params.patience,
            eval_batch_size: 32,
        };
        if let Err(TrainError::InvalidConfig { name, why }) = config.check() {
            invalid.push(Invalid::new(&[name], why));
        }
        check_weight_decay(params.weight_decay, &mut invalid);
        if params.max_seq_length.is_some_and(|n| n < 4) {
            invalid.push(Invalid::new(
                &["max_seq_length"],
                "must leave room for three special tokens and a word (at least 4)",
            ));
        }
        if params.negatives_per_query == Some(0) {
            invalid.push(
                Invalid::new(&["negatives_per_query"], "must be at least 1")
                    .with_help("a reranker learns by ranking positives above negatives"),
            );
        }
        if params.validation_negatives == 0 {
            invalid.push(Invalid::new(
                &["validation_negatives"],
                "must be at least 1",
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

impl Stage for TrainReranker {
    fn version(&self) -> u32 {
        1
    }

    fn inputs(&self) -> Vec<Input> {
        if self.data.is_some() {
            return Vec::new();
        }
        vec![
            Input {
                artifact: Artifact::TrainingData,
                required: true,
                instead: Some("data"),
            },
            Input {
                artifact: Artifact::Chunks,
                required: false,
                instead: None,
            },
        ]
    }

    /// Everything but `data`: the data file's bytes enter the key through the externals.
    fn params(&self) -> serde_json::Value {
        keyed_params(
            serde_json::to_value(&self.params).unwrap_or_default(),
            &self.model,
            self.seed,
        )
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        model_and_data_externals(env, &self.model, self.data.as_deref())
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let examples = estimate::training_examples(input, self.data.as_deref());
        let negatives = input.sizes.negatives.unwrap_or(1).min(
            self.params
                .negatives_per_query
                .map_or(u64::MAX, |n| n as u64),
        );
        // A (query, passage) pair is one text through the same kind of transformer.
        let pairs = examples * self.params.epochs * (1 + negatives);
        let mini_batch = self.params.mini_batch_size.min(self.params.batch_size);
        let speed = input.speeds.encoder(
            input.env,
            &self.model,
            self.params.max_seq_length,
            mini_batch,
        )?;
        let tokens = self.params.max_seq_length.unwrap_or(speed.model_tokens);
        Ok(Estimate {
            seconds: speed.train(pairs, tokens),
            peak_bytes: speed.train_peak(mini_batch, 1 + negatives as usize, tokens),
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
        let options = LoadOptions {
            seed: self.seed,
            max_seq_length: self.params.max_seq_length,
        };
        let model =
            CrossEncoder::load(&model_dir, &selected.device, options).map_err(io::model_error)?;
        if let HeadOrigin::Seeded(seed) = model.origin() {
            ctx.info(format!(
                "`{}` has no classification head: starting from one drawn with seed {seed}",
                self.model
            ));
        }
        let train = self.tokenize(&model, &examples)?;
        let without_negatives = examples.iter().filter(|e| e.negatives.is_empty()).count();
        if without_negatives > 0 {
            ctx.warn(format!(
                "{without_negatives} of {} training queries have no mined negative: they teach the reranker nothing with the listwise loss",
                examples.len()
            ));
        }
        let heldout = self.validation(ctx, &model, &examples)?;
        ctx.check_cancelled()?;

        let outcome = self.train(ctx, &model, &train, &heldout, &selected.description)?;
        self.save(
            ctx,
            &model,
            &outcome,
            (train.len(), data_hash),
            &selected.description,
        )?;
        Ok(StageOutcome {
            summary: self.report(ctx, &outcome, train.len(), heldout.len()),
        })
    }
}

impl TrainReranker {
    /// Each example's pairs: the query with its positive, then with each negative kept.
    fn tokenize(
        &self,
        model: &CrossEncoder,
        examples: &[TrainingExample],
    ) -> Result<Vec<RerankExample>, StageError> {
        let cap = self.params.negatives_per_query.unwrap_or(usize::MAX);
        let queries: Vec<&str> = examples.iter().map(|e| e.query.as_str()).collect();
        let groups: Vec<Vec<&str>> = examples
            .iter()
            .map(|e| {
                std::iter::once(e.positive.as_str())
                    .chain(e.negatives.iter().take(cap).map(|n| n.text.as_str()))
                    .collect()
            })
            .collect();
        grouped_pairs(model, &queries, &groups)
    }

    /// The held-out queries (a seeded sample of at most `validation_queries`), each positive
    /// grouped with the BM25 top passages that are not it.
    fn validation(
        &self,
        ctx: &StageContext,
        model: &CrossEncoder,
        train: &[TrainingExample],
    ) -> Result<Vec<RerankExample>, StageError> {
        let Ok(data) = ctx.input(Artifact::TrainingData) else {
            return Ok(Vec::new());
        };
        let mut heldout: Vec<TrainingExample> = io::read_jsonl(&data.join(HELDOUT_FILE))?;
        if heldout.is_empty() {
            ctx.warn(
                "the held-out split is empty: no early stopping (raise `mine.heldout_fraction`)",
            );
            return Ok(Vec::new());
        }
        heldout.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(self.seed));
        heldout.truncate(self.params.validation_queries);
        let passages: Vec<(String, String)> = match ctx.input(Artifact::Chunks) {
            Ok(chunks) => io::read_jsonl::<Chunk>(&chunks.join(CHUNKS_FILE))?
                .iter()
                .map(|chunk| (chunk.id.clone(), io::passage(chunk)))
                .collect(),
            Err(_) => {
                let mut seen = HashSet::new();
                train
                    .iter()
                    .chain(&heldout)
                    .flat_map(|e| {
                        std::iter::once((e.positive_id.clone(), e.positive.clone()))
                            .chain(e.negatives.iter().map(|n| (n.id.clone(), n.text.clone())))
                    })
                    .filter(|(id, _)| seen.insert(id.clone()))
                    .collect()
            }
        };
        let docs: Vec<(&str, &str)> = passages
            .iter()
            .map(|(id, text)| (id.as_str(), text.as_str()))
            .collect();
        let index = Bm25Index::build(&docs, None).map_err(io::index_error)?;
        let queries: Vec<&str> = heldout.iter().map(|e| e.query.as_str()).collect();
        let k = self.params.validation_negatives + 1;
        let hits = index
            .search_batch(&queries, k, &|_| {})
            .map_err(io::index_error)?;
        let groups: Vec<Vec<&str>> = heldout
            .iter()
            .zip(&hits)
            .map(|(example, hits)| {
                std::iter::once(example.positive.as_str())
                    .chain(
                        hits.iter()
                            .filter(|hit| passages[hit.doc].0 != example.positive_id)
                            .take(self.params.validation_negatives)
                            .map(|hit| passages[hit.doc].1.as_str()),
                    )
                    .collect()
            })
            .collect();
        grouped_pairs(model, &queries, &groups)
    }

    fn train(
        &self,
        ctx: &StageContext,
        model: &CrossEncoder,
        train: &[RerankExample],
        heldout: &[RerankExample],
        device: &str,
    ) -> Result<RerankOutcome, StageError> {
        let mut trainer = RerankTrainer::new(model, self.config.clone()).map_err(train_error)?;
        let total = trainer.planned_steps(train);
        let pairs: usize = train.iter().map(|e| 1 + e.negatives.len()).sum();
        ctx.info(format!(
            "training the reranker `{}` on {device}: {} queries ({pairs} pairs, up to {} tokens), {total} steps of {}, {} held-out queries for early stopping",
            self.model,
            train.len(),
            model.max_seq_length(),
            self.config.batch_size,
            heldout.len(),
        ));
        let bar = ctx.progress("training the reranker", Some(total));
        // The log grows a line per step as training goes (to follow with `tail -f`, as the
        // dashboard does); `save` writes the complete one at the end.
        let mut live_log = io::LiveLog::create(&ctx.out_dir.join(RERANK_LOG_FILE))?;
        let mut last_mrr = None;
        let outcome = trainer.run(train, heldout, &mut |step, eval| {
            live_log.append(step);
            if let Some(eval) = eval {
                last_mrr = Some(eval.mrr);
            }
            let mrr = last_mrr.map_or_else(String::new, |m| format!(" held-out MRR {m:.3}"));
            bar.set_with_message(
                step.step,
                &format!("loss {:.4} lr {:.1e}{mrr}", step.loss, step.lr),
            );
            if ctx.check_cancelled().is_err() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        drop(bar);
        live_log.finish()?;
        match outcome {
            Ok(outcome) => Ok(outcome),
            Err(TrainError::Stopped { .. }) => Err(StageError::Cancelled),
            Err(error) => Err(train_error(error)),
        }
    }

    fn save(
        &self,
        ctx: &StageContext,
        model: &CrossEncoder,
        outcome: &RerankOutcome,
        (examples, data_hash): (usize, String),
        device: &str,
    ) -> Result<(), StageError> {
        io::write_jsonl(&ctx.out_dir.join(RERANK_LOG_FILE), &outcome.log)?;
        io::write_jsonl(&ctx.out_dir.join(RERANK_EVALS_FILE), &outcome.evals)?;
        let mut extra = io::run_provenance(ctx);
        extra.insert("kind".to_owned(), "cross-encoder".into());
        extra.insert(
            "head".to_owned(),
            match model.origin() {
                HeadOrigin::Loaded => "loaded".into(),
                HeadOrigin::Seeded(seed) => format!("seeded with {seed}").into(),
            },
        );
        extra.insert("max_seq_length".to_owned(), model.max_seq_length().into());
        extra.insert("early_stopping".to_owned(), early_stopping(outcome));
        extra.insert(
            "median_step_seconds".to_owned(),
            outcome.median_step_seconds().into(),
        );
        let metadata = TrainingMetadata {
            base_model: self.model.clone(),
            data_hash,
            examples,
            loss: self.config.loss.name().to_owned(),
            matryoshka_dims: None,
            hyperparameters: self.params(),
            steps: outcome.steps_run,
            final_loss: outcome.final_loss(),
            train_seconds: outcome.train_seconds,
            peak_rss_bytes: outcome.peak_rss_bytes,
            device: device.to_owned(),
            tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            extra,
        };
        save_cross_encoder(
            model,
            &ctx.out_dir.join(RERANKER_DIR),
            &metadata,
            Some(&ctx.recipe_text),
        )
        .map_err(train_error)
    }

    /// The summary, and the table people see.
    fn report(
        &self,
        ctx: &StageContext,
        outcome: &RerankOutcome,
        queries: usize,
        heldout: usize,
    ) -> serde_json::Value {
        let figure = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
        let first_loss = outcome.log.first().map(|r| r.loss);
        let start = outcome.evals.first().map(|e| e.mrr);
        ctx.table(&Table {
            title: "reranker training".to_owned(),
            columns: vec!["".to_owned(), "value".to_owned()],
            rows: vec![
                vec!["queries".to_owned(), queries.to_string()],
                vec![
                    "steps".to_owned(),
                    format!("{} of {}", outcome.steps_run, outcome.steps_planned),
                ],
                vec!["first loss".to_owned(), figure(first_loss)],
                vec!["final loss".to_owned(), figure(outcome.final_loss())],
                vec![
                    format!("held-out MRR ({heldout} queries), start"),
                    figure(start),
                ],
                vec![
                    "held-out MRR, kept".to_owned(),
                    outcome.best.map_or_else(
                        || "-".to_owned(),
                        |b| format!("{:.4} (step {})", b.mrr, b.step),
                    ),
                ],
                vec![
                    "seconds per step (median)".to_owned(),
                    outcome
                        .median_step_seconds()
                        .map_or_else(|| "-".to_owned(), |s| format!("{s:.2}")),
                ],
            ],
        });
        serde_json::json!({
            "queries": queries,
            "steps": outcome.steps_run,
            "steps_planned": outcome.steps_planned,
            "first_loss": first_loss,
            "final_loss": outcome.final_loss(),
            "early_stopping": early_stopping(outcome),
            "train_seconds": outcome.train_seconds,
            "median_step_seconds": outcome.median_step_seconds(),
            "peak_rss_bytes": outcome.peak_rss_bytes,
        })
    }
}

fn early_stopping(outcome: &RerankOutcome) -> serde_json::Value {
    serde_json::json!({
        "heldout_mrr_start": outcome.evals.first().map(|e| e.mrr),
        "kept": outcome.best,
        "stopped_early": outcome.stopped_early,
    })
}

/// Tokenizes each query with each passage of its group (positive first, never empty).
fn grouped_pairs(
    model: &CrossEncoder,
    queries: &[&str],
    groups: &[Vec<&str>],
) -> Result<Vec<RerankExample>, StageError> {
    let pairs: Vec<(&str, &str)> = queries
        .iter()
        .zip(groups)
        .flat_map(|(query, passages)| passages.iter().map(move |p| (*query, *p)))
        .collect();
    let mut ids = model.pair_ids(&pairs).map_err(io::model_error)?.into_iter();
    Ok(groups
        .iter()
        .map(|passages| {
            let positive = ids.next().unwrap_or_default();
            let negatives = ids.by_ref().take(passages.len() - 1).collect();
            RerankExample {
                positive,
                negatives,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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

    fn build(yaml: &str, dir: &Path) -> Result<TrainReranker, Vec<Invalid>> {
        let params: TrainRerankerParams = serde_yaml::from_str(yaml).expect("parses");
        TrainReranker::new(params, &env(dir))
    }

    #[test]
    fn defaults_read_mine_and_start_from_the_base_model() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stage = build("{}", dir.path()).expect("defaults are valid");
        let inputs = stage.inputs();
        assert_eq!(inputs[0].artifact, Artifact::TrainingData);
        assert!(inputs[0].required);
        assert_eq!(inputs[1].artifact, Artifact::Chunks);
        assert!(!inputs[1].required);
        let params = stage.params();
        assert_eq!(params["loss"], "listwise");
        assert_eq!(params["model"], "sentence-transformers/all-MiniLM-L6-v2");
        assert_eq!(params["seed"], 3);
        assert_eq!(params["eval_every"], 50);

        std::fs::write(dir.path().join("train.jsonl"), "").expect("write");
        let stage = build("{data: train.jsonl, loss: bce}", dir.path()).expect("valid");
        assert!(stage.inputs().is_empty());
        assert!(stage.params().get("data").is_none());
        assert_eq!(stage.params()["loss"], "bce");
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (yaml, key) in [
            ("batch_size: 0", "batch_size"),
            ("learning_rate: 0", "learning_rate"),
            ("eval_every: 0", "eval_every"),
            ("patience: 0", "patience"),
            ("negatives_per_query: 0", "negatives_per_query"),
            ("max_seq_length: 3", "max_seq_length"),
            ("validation_negatives: 0", "validation_negatives"),
            ("data: missing.jsonl", "data"),
        ] {
            let problems = build(yaml, dir.path()).err().unwrap_or_default();
            assert!(
                problems.iter().any(|p| p.path == [key]),
                "`{yaml}` should be refused at `{key}`: {problems:?}"
            );
        }
        let error =
            serde_yaml::from_str::<TrainRerankerParams>("loss: hinge").expect_err("unknown loss");
        assert!(error.to_string().contains("hinge"), "{error}");
    }
}
