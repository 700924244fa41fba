//! The mine stage: hard negatives for each (query, positive chunk) pair, and the split into
//! training examples and a held-out set by source document.
//!
//! Candidates come from BM25 and from dense search with the base model, merged and scored on one
//! scale (cosine with the base model when dense search is on). Then sentence-transformers'
//! proven knobs (`mine_hard_negatives` in sentence_transformers/util.py): a rank window, an
//! absolute `max_score`, absolute and relative margins against the positive's score, top or
//! seeded random sampling. A chunk of the positive's own document is never a negative when
//! `exclude_same_document` is on: sections of one page often answer the same question.
//!
//! Output: `train.jsonl` and `heldout.jsonl` in ragd's training-data format, and `stats.json`;
//! with `rounds: 2`, also `second_round.json` and a copy of the chunks for train's second round.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{self, Estimate, EstimateInput};
use super::io::{
    self, CHUNKS_FILE, HELDOUT_FILE, LinkedPassage, QUERIES_FILE, QueryRecord, SECOND_ROUND_FILE,
    TRAIN_FILE, TrainingExample,
};
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::corpus::Chunk;
use crate::index::{Bm25Index, DenseIndex, Hit};
use crate::model::encoder::SentenceEncoder;
use crate::model::prompts::TextRole;

/// How negatives are picked from the filtered candidates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// The highest-scoring candidates: the hardest negatives.
    #[default]
    Top,
    /// A seeded random sample of the candidates left in the window.
    Random,
}

/// The `mine:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct MineParams {
    /// Draw candidates from BM25 (lexical) search.
    #[serde(default = "yes")]
    pub bm25: bool,
    /// Draw candidates from dense search with the base model, and score every candidate by its
    /// cosine similarity to the query (otherwise BM25 scores rank and filter).
    #[serde(default = "yes")]
    pub dense: bool,
    /// Hard negatives per query.
    #[serde(default = "default_negatives")]
    pub negatives_per_query: usize,
    /// Skip the best `range_min` candidates: the very top often holds unlabelled answers.
    #[serde(default)]
    pub range_min: usize,
    /// Consider candidates down to this rank (per source before merging).
    #[serde(default = "default_range_max")]
    pub range_max: usize,
    /// Drop candidates scoring above this (cosine): near-duplicates of the answer.
    #[serde(default)]
    pub max_score: Option<f32>,
    /// Drop candidates scoring above `positive − margin`.
    #[serde(default)]
    pub margin: Option<f32>,
    /// Drop candidates scoring above `positive − |positive| × relative_margin` (correct for
    /// negative scores too). 0.05 keeps out candidates almost as close as the answer.
    #[serde(default = "default_relative_margin")]
    pub relative_margin: Option<f32>,
    /// `top` takes the hardest candidates; `random` a seeded sample of the window.
    #[serde(default)]
    pub sampling: Sampling,
    /// Never take a negative from the positive's own source document.
    #[serde(default = "yes")]
    pub exclude_same_document: bool,
    /// The share of source documents whose queries are held out for evaluation (no chunk of a
    /// held-out document appears in training).
    #[serde(default = "default_heldout")]
    pub heldout_fraction: f64,
    /// Texts per batch when encoding with the base model.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Give each query a second positive: the chunk after its own in the same section (same
    /// document and heading), which a question about a passage often also answers. Training
    /// counts both as right answers, and the held-out split's qrels list both. (Off, it stays
    /// out of the cache key: mining cached before it existed stays valid.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continuation_positive: bool,
    /// 2: after training on these negatives, train mines them again with the model it trained
    /// (harder negatives: what that model still confuses) and trains again from the base on
    /// them; evaluate reports both rounds. 1: one round. (At 1 it stays out of the cache key.)
    #[serde(default = "one_round", skip_serializing_if = "is_one_round")]
    pub rounds: u32,
    /// A cross-encoder (hub id or folder: e.g. `cross-encoder/ms-marco-MiniLM-L6-v2`, or a
    /// reranker an earlier run registered) that rescores each query's candidates in the window
    /// and its positive, as sentence-transformers' `mine_hard_negatives` does: the sigmoid of
    /// its logit replaces the retrievers' score, so `max_score`, `margin` and `relative_margin`
    /// drop what it reads as nearly as relevant as the positive (likely unlabelled answers).
    /// Costs a cross-encoder pass per candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_encoder: Option<String>,
}

fn one_round() -> u32 {
    1
}
fn is_one_round(rounds: &u32) -> bool {
    *rounds == 1
}

/// What `mine.rounds: 2` leaves for train in mine's artifact: the settings to mine with again
/// (`second_round.json`) and the chunks to mine from (`chunks.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecondRound {
    pub params: MineParams,
    pub seed: u64,
}

impl SecondRound {
    /// The second round `dir` (mine's artifact) asks for, with its chunks; `None` for one round.
    pub fn read(dir: &Path) -> Result<Option<(Self, Vec<Chunk>)>, StageError> {
        let file = dir.join(SECOND_ROUND_FILE);
        if !file.is_file() {
            return Ok(None);
        }
        let round: Self = serde_json::from_str(&fs_err::read_to_string(file)?)?;
        let chunks = io::read_jsonl(&dir.join(CHUNKS_FILE))?;
        Ok(Some((round, chunks)))
    }

    /// Each training example's negatives mined again by `encoder` (the first round's model) with
    /// the same settings; its positives kept. Shows the round's mining table.
    pub fn mine_again(
        &self,
        ctx: &StageContext,
        encoder: &SentenceEncoder,
        chunks: &[Chunk],
        examples: &[TrainingExample],
    ) -> Result<Vec<TrainingExample>, StageError> {
        let passages: Vec<String> = chunks.iter().map(io::passage).collect();
        let position = positions(chunks);
        let views: Vec<QueryView> = examples
            .iter()
            .map(|e| QueryView {
                text: &e.query,
                positive: &e.positive,
                chunk_id: &e.positive_id,
                doc_id: position
                    .get(e.positive_id.as_str())
                    .map_or(e.source_document.as_str(), |&i| chunks[i].doc_id.as_str()),
            })
            .collect();
        let embedded = if self.params.dense {
            let texts: Vec<&str> = passages.iter().map(String::as_str).collect();
            let bar = ctx.progress(
                "encoding chunks with the first round's model",
                Some(texts.len() as u64),
            );
            let docs = encoder
                .encode_as(
                    &texts,
                    TextRole::Passage,
                    self.params.batch_size,
                    &mut |n| bar.set(n as u64),
                )
                .map_err(io::model_error)?;
            drop(bar);
            Some(embed_queries(
                ctx,
                encoder,
                docs,
                &views,
                self.params.batch_size,
            )?)
        } else {
            None
        };
        let candidates = self
            .params
            .candidates(ctx, chunks, &passages, &views, embedded)?;
        let mut documents: Vec<&str> = views.iter().map(|v| v.doc_id).collect();
        documents.sort_unstable();
        documents.dedup();
        let mut stats = MineStats {
            queries: examples.len(),
            train_queries: examples.len(),
            train_documents: documents.len(),
            ..MineStats::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(1));
        let mut again = Vec::with_capacity(examples.len());
        for ((example, view), scored) in examples.iter().zip(&views).zip(candidates) {
            let positives = Positives {
                own: position.get(example.positive_id.as_str()).copied(),
                continuation: example
                    .extra_positives
                    .first()
                    .and_then(|p| position.get(p.id.as_str()).copied()),
            };
            let chosen = self
                .params
                .select(view, positives, scored, chunks, &mut stats, &mut rng);
            *stats.negatives_histogram.entry(chosen.len()).or_default() += 1;
            again.push(TrainingExample {
                negatives: chosen
                    .into_iter()
                    .map(|i| LinkedPassage {
                        id: chunks[i].id.clone(),
                        text: passages[i].clone(),
                    })
                    .collect(),
                ..example.clone()
            });
        }
        let mut table = stats.table();
        table.title = "mining, second round".to_owned();
        ctx.table(&table);
        Ok(again)
    }
}

/// What mining needs of a query: its text, its positive chunk and that chunk's document.
struct QueryView<'a> {
    text: &'a str,
    chunk_id: &'a str,
    doc_id: &'a str,
    /// The text training pulls the query towards, which a cross-encoder scores.
    positive: &'a str,
}

/// The mining model's unit-length embeddings of every chunk and query, row after row.
struct Embedded {
    dim: usize,
    docs: Vec<f32>,
    queries: Vec<f32>,
}

/// The queries of `views` embedded by `encoder`, beside the chunks' `docs`.
fn embed_queries(
    ctx: &StageContext,
    encoder: &SentenceEncoder,
    docs: crate::model::encoder::Embeddings,
    views: &[QueryView],
    batch_size: usize,
) -> Result<Embedded, StageError> {
    ctx.check_cancelled()?;
    let texts: Vec<&str> = views.iter().map(|q| q.text).collect();
    let bar = ctx.progress("encoding queries", Some(texts.len() as u64));
    let queries = encoder
        .encode_as(&texts, TextRole::Query, batch_size, &mut |n| {
            bar.set(n as u64);
        })
        .map_err(io::model_error)?;
    Ok(Embedded {
        dim: encoder.dim(),
        docs: docs.into_vec(),
        queries: queries.into_vec(),
    })
}

/// Chunk id → position.
fn positions(chunks: &[Chunk]) -> HashMap<&str, usize> {
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect()
}

impl Default for MineParams {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

fn yes() -> bool {
    true
}
fn default_negatives() -> usize {
    3
}
fn default_range_max() -> usize {
    30
}
fn default_relative_margin() -> Option<f32> {
    Some(0.05)
}
fn default_heldout() -> f64 {
    0.2
}
fn default_batch() -> usize {
    64
}

pub struct Mine {
    params: MineParams,
    base_model: String,
    seed: u64,
}

impl StageDef for Mine {
    const KIND: &'static str = "mine";
    const SECTION: &'static str = "mine";
    const ABOUT: &'static str = "Find hard negatives (BM25 + dense) and split examples into training and held-out by document.";
    const PRODUCES: Artifact = Artifact::TrainingData;
    type Params = MineParams;

    fn new(params: MineParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        if !params.bm25 && !params.dense {
            invalid.push(
                Invalid::new(
                    &["dense"],
                    "is off and so is `bm25`: no source of candidates",
                )
                .with_help("turn on `bm25`, `dense` or both"),
            );
        }
        if params.range_max == 0 || params.range_min >= params.range_max {
            invalid.push(Invalid::new(
                &["range_max"],
                format!("must be above `range_min` ({})", params.range_min),
            ));
        }
        if !(0.0..1.0).contains(&params.heldout_fraction) {
            invalid.push(Invalid::new(
                &["heldout_fraction"],
                format!("{} is not in [0, 1)", params.heldout_fraction),
            ));
        }
        if params.batch_size == 0 {
            invalid.push(Invalid::new(&["batch_size"], "must be at least 1"));
        }
        if !(1..=2).contains(&params.rounds) {
            invalid.push(Invalid::new(&["rounds"], "must be 1 or 2"));
        }
        for (key, value) in [
            ("margin", params.margin),
            ("relative_margin", params.relative_margin),
        ] {
            if value.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                invalid.push(Invalid::new(&[key], "must be between 0 and 1"));
            }
        }
        if invalid.is_empty() {
            Ok(Self {
                params,
                base_model: env.base_model.clone(),
                seed: env.seed,
            })
        } else {
            Err(invalid)
        }
    }
}

impl Stage for Mine {
    /// 2: carries `provenance.json` on to evaluate.
    fn version(&self) -> u32 {
        2
    }

    fn inputs(&self) -> Vec<Input> {
        [Artifact::Chunks, Artifact::Queries]
            .map(|artifact| Input {
                artifact,
                required: true,
                instead: None,
            })
            .to_vec()
    }

    fn params(&self) -> serde_json::Value {
        let mut params = serde_json::to_value(&self.params).unwrap_or_default();
        params["seed"] = self.seed.into();
        params
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let queries = input.sizes.queries.unwrap_or(0);
        let mut estimate = if self.params.dense {
            // The judge embedded the chunks with the same model just before: mine reuses them.
            estimate::encoding(input, &self.base_model, 0, queries)?
        } else {
            Estimate::brief(input.sizes)
        };
        estimate.sizes.examples =
            Some((queries as f64 * (1. - self.params.heldout_fraction)).round() as u64);
        estimate.sizes.negatives = Some(self.params.negatives_per_query as u64);
        estimate.sizes.rounds = Some(u64::from(self.params.rounds));
        Ok(estimate)
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        let mut externals = Vec::new();
        if self.params.dense {
            externals.push(External::base_model(env, &self.base_model)?);
            externals.extend(External::encode_precision(env));
        }
        if let Some(reference) = &self.params.cross_encoder {
            externals.push(External::model(env, "cross_encoder", reference)?);
        }
        Ok(externals)
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let chunks: Vec<Chunk> = io::read_jsonl(&ctx.input(Artifact::Chunks)?.join(CHUNKS_FILE))?;
        let queries: Vec<QueryRecord> =
            io::read_jsonl(&ctx.input(Artifact::Queries)?.join(QUERIES_FILE))?;
        if queries.is_empty() {
            return Err(StageError::Failed(
                "there are no queries to mine negatives for".to_owned(),
            ));
        }
        let (train, heldout) = split_by_document(&queries, self.params.heldout_fraction, self.seed);
        let passages: Vec<String> = chunks.iter().map(io::passage).collect();
        let position = positions(&chunks);

        let continuation = |chunk_id: &str| {
            let at = *position.get(chunk_id)?;
            continuation_of(&chunks, at).filter(|_| self.params.continuation_positive)
        };
        let linked = |i: usize| LinkedPassage {
            id: chunks[i].id.clone(),
            text: passages[i].clone(),
        };
        let views: Vec<QueryView> = train
            .iter()
            .map(|q| QueryView {
                text: &q.query,
                positive: &q.positive,
                chunk_id: &q.chunk_id,
                doc_id: &q.doc_id,
            })
            .collect();
        let embedded = if self.params.dense {
            let texts: Vec<&str> = passages.iter().map(String::as_str).collect();
            let (encoder, docs) =
                io::encode_corpus(ctx, &self.base_model, &texts, self.params.batch_size)?;
            Some(embed_queries(
                ctx,
                &encoder,
                docs,
                &views,
                self.params.batch_size,
            )?)
        } else {
            None
        };
        let candidates = self
            .params
            .candidates(ctx, &chunks, &passages, &views, embedded)?;
        ctx.check_cancelled()?;
        let mut stats = MineStats {
            queries: queries.len(),
            train_queries: train.len(),
            heldout_queries: heldout.len(),
            train_documents: count_documents(&train),
            heldout_documents: count_documents(&heldout),
            ..MineStats::default()
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut examples = Vec::with_capacity(train.len());
        for ((query, view), scored) in train.iter().zip(&views).zip(candidates) {
            let positives = Positives {
                own: position.get(query.chunk_id.as_str()).copied(),
                continuation: continuation(&query.chunk_id),
            };
            let chosen = self
                .params
                .select(view, positives, scored, &chunks, &mut stats, &mut rng);
            *stats.negatives_histogram.entry(chosen.len()).or_default() += 1;
            stats.continuation_positives += usize::from(positives.continuation.is_some());
            examples.push(TrainingExample {
                query: query.query.clone(),
                positive: query.positive.clone(),
                positive_id: query.chunk_id.clone(),
                negatives: chosen.into_iter().map(linked).collect(),
                extra_positives: positives.continuation.into_iter().map(linked).collect(),
                source_document: query.source.clone(),
            });
        }
        let held: Vec<TrainingExample> = heldout
            .iter()
            .map(|q| TrainingExample {
                query: q.query.clone(),
                positive: q.positive.clone(),
                positive_id: q.chunk_id.clone(),
                negatives: Vec::new(),
                extra_positives: continuation(&q.chunk_id).into_iter().map(linked).collect(),
                source_document: q.source.clone(),
            })
            .collect();
        io::write_jsonl(&ctx.out_dir.join(TRAIN_FILE), &examples)?;
        if let Some(provenance) = io::Provenance::read(ctx.input(Artifact::Queries)?) {
            provenance.write(&ctx.out_dir)?;
        }
        io::write_jsonl(&ctx.out_dir.join(HELDOUT_FILE), &held)?;
        if self.params.rounds == 2 {
            let round = SecondRound {
                params: self.params.clone(),
                seed: self.seed,
            };
            io::write_json(&ctx.out_dir.join(SECOND_ROUND_FILE), &round)?;
            io::write_jsonl(&ctx.out_dir.join(CHUNKS_FILE), &chunks)?;
        }
        io::write_json(&ctx.out_dir.join("stats.json"), &stats)?;
        ctx.table(&stats.table());
        if examples.is_empty() {
            return Err(StageError::Failed(
                "no training example is left: every document was held out (lower `heldout_fraction`)".to_owned(),
            ));
        }
        Ok(StageOutcome {
            summary: serde_json::to_value(&stats)?,
        })
    }
}

/// A candidate chunk (position) with its score on the common scale.
type Scored = Vec<(usize, f32)>;

/// The positions of a query's right answers among the chunks, which are never its negatives.
#[derive(Debug, Clone, Copy)]
struct Positives {
    own: Option<usize>,
    continuation: Option<usize>,
}

impl MineParams {
    /// Merged, scored candidates per query (best first), plus the positive's score when the
    /// mining model (`embedded`: dense search) or BM25 scores it, so margins can be checked.
    fn candidates(
        &self,
        ctx: &StageContext,
        chunks: &[Chunk],
        passages: &[String],
        queries: &[QueryView],
        embedded: Option<Embedded>,
    ) -> Result<Vec<(Scored, Option<f32>)>, StageError> {
        let k = self.range_max + 1;
        let texts: Vec<&str> = queries.iter().map(|q| q.text).collect();
        let mut lists: Vec<Scored> = vec![Vec::new(); queries.len()];

        if let Some(embedded) = &embedded {
            let index =
                DenseIndex::new(embedded.dim, embedded.docs.clone()).map_err(io::index_error)?;
            let bar = ctx.progress("dense search", Some(texts.len() as u64));
            let hits = index
                .search_batch(&embedded.queries, k, &|n| bar.inc(n as u64))
                .map_err(io::index_error)?;
            drop(bar);
            for (list, hits) in lists.iter_mut().zip(&hits) {
                list.extend(hits.iter().map(|h| (h.doc, h.score)));
            }
        }
        if self.bm25 {
            let docs: Vec<(&str, &str)> = chunks
                .iter()
                .zip(passages)
                .map(|(c, p)| (c.id.as_str(), p.as_str()))
                .collect();
            let index = Bm25Index::build(&docs, None).map_err(io::index_error)?;
            let bar = ctx.progress("BM25 search", Some(texts.len() as u64));
            let hits = index
                .search_batch(&texts, k, &|n| bar.inc(n as u64))
                .map_err(io::index_error)?;
            drop(bar);
            for (list, hits) in lists.iter_mut().zip(hits) {
                merge(list, &hits);
            }
        }
        // Put every candidate (and the positive) on one scale: cosine when dense search ran.
        let position = positions(chunks);
        let mut out = Vec::with_capacity(queries.len());
        for (q, mut list) in lists.into_iter().enumerate() {
            let positive = position.get(queries[q].chunk_id).copied();
            let positive_score = match &embedded {
                Some(Embedded { dim, docs, queries }) => {
                    let dim = *dim;
                    let query = &queries[q * dim..(q + 1) * dim];
                    let score = |doc: usize| dot(&docs[doc * dim..(doc + 1) * dim], query);
                    for (doc, s) in &mut list {
                        *s = score(*doc);
                    }
                    positive.map(score)
                }
                None => positive.and_then(|p| list.iter().find(|(d, _)| *d == p).map(|(_, s)| *s)),
            };
            list.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            out.push((list, positive_score));
        }
        match &self.cross_encoder {
            Some(reference) => rescore(ctx, reference, passages, queries, out, self.range_max),
            None => Ok(out),
        }
    }

    /// Applies the window, filters and sampling to one query's candidates; returns positions.
    fn select(
        &self,
        query: &QueryView,
        positives: Positives,
        (scored, positive_score): (Scored, Option<f32>),
        chunks: &[Chunk],
        stats: &mut MineStats,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Vec<usize> {
        let mut kept = Vec::new();
        for (rank, (doc, score)) in scored.into_iter().enumerate() {
            stats.candidates += 1;
            let drop = if Some(doc) == positives.own || chunks[doc].id == query.chunk_id {
                Some("the positive itself")
            } else if Some(doc) == positives.continuation {
                Some("the positive's continuation")
            } else if rank < self.range_min || rank >= self.range_max {
                Some("outside the rank window")
            } else if self.exclude_same_document && chunks[doc].doc_id == query.doc_id {
                Some("same document as the positive")
            } else if self.max_score.is_some_and(|max| score > max) {
                Some("above max_score")
            } else if let (Some(m), Some(pos)) = (self.margin, positive_score)
                && score > pos - m
            {
                Some("within margin of the positive")
            } else if let (Some(m), Some(pos)) = (self.relative_margin, positive_score)
                && score > relative_threshold(pos, m)
            {
                Some("within relative margin of the positive")
            } else {
                None
            };
            match drop {
                Some(reason) => *stats.dropped.entry(reason.to_owned()).or_default() += 1,
                None => kept.push(doc),
            }
        }
        if self.sampling == Sampling::Random {
            kept.shuffle(rng);
        }
        kept.truncate(self.negatives_per_query);
        kept
    }
}

/// Each query's first `window` candidates and its positive scored again by the cross-encoder
/// `reference` (the sigmoid of its logit, sentence-transformers' default activation), best first.
fn rescore(
    ctx: &StageContext,
    reference: &str,
    passages: &[String],
    queries: &[QueryView],
    candidates: Vec<(Scored, Option<f32>)>,
    window: usize,
) -> Result<Vec<(Scored, Option<f32>)>, StageError> {
    let cross_encoder = io::load_cross_encoder(&ctx.env, reference)?;
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (query, (list, _)) in queries.iter().zip(&candidates) {
        pairs.push((query.text, query.positive));
        for &(doc, _) in list.iter().take(window) {
            pairs.push((query.text, passages[doc].as_str()));
        }
    }
    let bar = ctx.progress("cross-encoder rescoring", Some(pairs.len() as u64));
    let logits = cross_encoder
        .score(&pairs, CROSS_ENCODER_BATCH, &mut |n| bar.set(n as u64))
        .map_err(io::model_error)?;
    drop(bar);
    ctx.info(format!(
        "the cross-encoder `{reference}` rescored {} candidates and {} positives",
        pairs.len() - queries.len(),
        queries.len()
    ));
    let mut scores = logits.into_iter().map(|l| 1.0 / (1.0 + (-l).exp()));
    let mut out = Vec::with_capacity(candidates.len());
    for (list, _) in candidates {
        let positive = scores.next();
        let mut rescored: Scored = list
            .into_iter()
            .take(window)
            .map(|(doc, _)| (doc, scores.next().unwrap_or(f32::NEG_INFINITY)))
            .collect();
        rescored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.push((rescored, positive));
    }
    Ok(out)
}

/// Pairs per cross-encoder batch while rescoring.
const CROSS_ENCODER_BATCH: usize = 32;

/// The chunk continuing the section of chunk `at`: the next one, when it has the same document
/// and heading path (chunks are written in reading order).
fn continuation_of(chunks: &[Chunk], at: usize) -> Option<usize> {
    let next = chunks.get(at + 1)?;
    (next.doc_id == chunks[at].doc_id && next.title == chunks[at].title).then_some(at + 1)
}

/// The highest score a negative may have: `pos − |pos| × m`. With `pos × (1 − m)` instead, a
/// negative positive score would move the threshold *up*, letting through candidates better than
/// the answer.
pub fn relative_threshold(positive: f32, margin: f32) -> f32 {
    positive - positive.abs() * margin
}

/// Cosine similarity of two L2-normalised embeddings.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Adds the hits not already in `list` (their scores are replaced when scoring by cosine).
fn merge(list: &mut Scored, hits: &[Hit]) {
    for hit in hits {
        if !list.iter().any(|(d, _)| *d == hit.doc) {
            list.push((hit.doc, hit.score));
        }
    }
}

/// Splits queries by source document: the documents whose seeded hash ranks in the first
/// `fraction` are held out, at least one when there are two or more documents.
fn split_by_document(
    queries: &[QueryRecord],
    fraction: f64,
    seed: u64,
) -> (Vec<&QueryRecord>, Vec<&QueryRecord>) {
    let mut documents: Vec<&str> = queries.iter().map(|q| q.doc_id.as_str()).collect();
    documents.sort_unstable();
    documents.dedup();
    let rank = |doc: &str| {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&seed.to_le_bytes());
        hasher.update(doc.as_bytes());
        *hasher.finalize().as_bytes()
    };
    documents.sort_by_key(|d| rank(d));
    let mut held = (documents.len() as f64 * fraction).round() as usize;
    if fraction > 0.0 && held == 0 && documents.len() >= 2 {
        held = 1;
    }
    let heldout: std::collections::HashSet<&str> = documents[..held].iter().copied().collect();
    queries
        .iter()
        .partition(|q| !heldout.contains(q.doc_id.as_str()))
}

fn count_documents(queries: &[&QueryRecord]) -> usize {
    let mut docs: Vec<&str> = queries.iter().map(|q| q.doc_id.as_str()).collect();
    docs.sort_unstable();
    docs.dedup();
    docs.len()
}

/// What mining saw and dropped, for `stats.json` and the summary table.
#[derive(Debug, Default, Serialize)]
struct MineStats {
    queries: usize,
    train_queries: usize,
    heldout_queries: usize,
    train_documents: usize,
    heldout_documents: usize,
    candidates: usize,
    dropped: BTreeMap<String, usize>,
    /// Negatives per training example → number of examples.
    negatives_histogram: BTreeMap<usize, usize>,
    /// Training examples given their chunk's continuation as a second positive.
    continuation_positives: usize,
}

impl MineStats {
    fn table(&self) -> Table {
        let mut rows = vec![
            vec![
                "training examples".to_owned(),
                format!(
                    "{} ({} documents)",
                    self.train_queries, self.train_documents
                ),
            ],
            vec!["candidates seen".to_owned(), self.candidates.to_string()],
        ];
        if self.heldout_queries > 0 {
            rows.insert(
                1,
                vec![
                    "held out".to_owned(),
                    format!(
                        "{} ({} documents)",
                        self.heldout_queries, self.heldout_documents
                    ),
                ],
            );
        }
        for (reason, n) in &self.dropped {
            rows.push(vec![format!("dropped: {reason}"), n.to_string()]);
        }
        let histogram: Vec<String> = self
            .negatives_histogram
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        rows.push(vec!["negatives per query".to_owned(), histogram.join(", ")]);
        if self.continuation_positives > 0 {
            rows.push(vec![
                "second positive (continuation)".to_owned(),
                self.continuation_positives.to_string(),
            ]);
        }
        Table {
            title: "mining".to_owned(),
            columns: vec!["what".to_owned(), "count".to_owned()],
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_margin_is_correct_for_negative_scores() {
        // A positive at 0.8 with a 5% margin: negatives must score at most 0.76.
        assert!((relative_threshold(0.8, 0.05) - 0.76).abs() < 1e-6);
        // A positive at -0.2: the threshold is below it (-0.21), never above (-0.19).
        assert!((relative_threshold(-0.2, 0.05) + 0.21).abs() < 1e-6);
        assert!(relative_threshold(-0.2, 0.05) < -0.2);
    }

    fn query(id: &str, doc: &str) -> QueryRecord {
        QueryRecord {
            id: id.to_owned(),
            query: format!("question {id}"),
            chunk_id: format!("c-{id}"),
            doc_id: doc.to_owned(),
            source: doc.to_owned(),
            positive: "text".to_owned(),
            strategy: "ict".to_owned(),
        }
    }

    fn chunk(id: &str, doc: &str) -> Chunk {
        Chunk {
            id: id.to_owned(),
            doc_id: doc.to_owned(),
            source: doc.to_owned(),
            title: String::new(),
            text: format!("text of {id}"),
            n_tokens: 3,
        }
    }

    #[test]
    fn a_continuation_is_the_next_chunk_of_the_same_section() {
        let mut chunks = vec![
            chunk("a1", "d1"),
            chunk("a2", "d1"),
            chunk("b1", "d2"),
            chunk("b2", "d2"),
            chunk("c1", "d3"),
        ];
        chunks[3].title = "Another heading".to_owned();
        assert_eq!(continuation_of(&chunks, 0), Some(1));
        assert_eq!(continuation_of(&chunks, 1), None, "the next document");
        assert_eq!(continuation_of(&chunks, 2), None, "another section");
        assert_eq!(continuation_of(&chunks, 4), None, "the last chunk");
    }

    #[test]
    fn the_split_keeps_each_document_on_one_side() {
        let queries: Vec<QueryRecord> = (0..40)
            .map(|i| query(&i.to_string(), &format!("d{}", i % 10)))
            .collect();
        let (train, held) = split_by_document(&queries, 0.2, 7);
        assert_eq!(count_documents(&held), 2);
        assert_eq!(count_documents(&train), 8);
        for h in &held {
            assert!(train.iter().all(|t| t.doc_id != h.doc_id));
        }
        // Deterministic for a seed.
        let (_, again) = split_by_document(&queries, 0.2, 7);
        assert_eq!(held, again);
    }

    #[test]
    fn a_negative_is_never_the_positive_or_its_document_or_too_close() {
        let stage = Mine::new(
            MineParams {
                relative_margin: Some(0.1),
                negatives_per_query: 5,
                ..MineParams::default()
            },
            &RecipeEnv {
                dir: ".".into(),
                name: "t".into(),
                base_model: "x/y".into(),
                seed: 1,
                accelerator: crate::model::device::Accelerator::Cpu,
                encode_precision: Default::default(),
            },
        )
        .unwrap_or_else(|_| panic!("valid params"));
        let chunks = vec![
            chunk("c-q", "d1"),   // the positive
            chunk("same", "d1"),  // same document
            chunk("close", "d2"), // within the margin
            chunk("far", "d3"),   // a fine negative
        ];
        let q = query("q", "d1");
        // Positive scores 0.5: the relative threshold is 0.45.
        let scored = vec![(0, 0.5), (1, 0.48), (2, 0.47), (3, 0.30)];
        let mut stats = MineStats::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let view = QueryView {
            text: &q.query,
            positive: &q.positive,
            chunk_id: &q.chunk_id,
            doc_id: &q.doc_id,
        };
        let chosen = stage.params.select(
            &view,
            Positives {
                own: Some(0),
                continuation: None,
            },
            (scored, Some(0.5)),
            &chunks,
            &mut stats,
            &mut rng,
        );
        assert_eq!(chosen, vec![3]);
        assert_eq!(stats.dropped["the positive itself"], 1);
        assert_eq!(stats.dropped["same document as the positive"], 1);
        assert_eq!(stats.dropped["within relative margin of the positive"], 1);
    }
}
