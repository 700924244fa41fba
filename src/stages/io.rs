//! What stages hand each other (the record formats of their artifacts) and the reading, writing
//! and model loading they all need.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{StageContext, StageEnv, StageError};
use crate::cache::embeddings::EmbeddingCache;
use crate::corpus::Chunk;
use crate::model::cross_encoder::{CrossEncoder, LoadOptions};
use crate::model::encoder::{Embeddings, SentenceEncoder};
use crate::model::hub::SENTENCE_TRANSFORMER_FILES;
use crate::model::prompts::TextRole;

/// `chunks.jsonl` of the chunk stage.
pub const CHUNKS_FILE: &str = "chunks.jsonl";
/// `queries.jsonl` of query-gen and judge.
pub const QUERIES_FILE: &str = "queries.jsonl";
/// The training examples of mine, and its held-out split for evaluate.
pub const TRAIN_FILE: &str = "train.jsonl";
pub const HELDOUT_FILE: &str = "heldout.jsonl";
/// Where training data came from ([`Provenance`]), carried from query-gen through judge and mine.
pub const PROVENANCE_FILE: &str = "provenance.json";
/// [`Artifact::Model`](super::Artifact::Model): the sentence-transformers folder train writes,
/// its per-step log, and how it was merged with the base (`crate::eval::report::MergeSearch`).
pub const MODEL_DIR: &str = "model";
pub const TRAIN_LOG_FILE: &str = "train_log.jsonl";
pub const MERGE_FILE: &str = "merge.json";
/// With `mine.rounds: 2`, what mine leaves for train's second round ([`super::mine::SecondRound`]:
/// the settings, beside a copy of the chunks).
pub const SECOND_ROUND_FILE: &str = "second_round.json";
/// With `mine.rounds: 2`, the first round's model, log and the training data mined with it for
/// the second round, in train's artifact.
pub const FIRST_ROUND_DIR: &str = "round1";
pub const SECOND_ROUND_TRAIN_FILE: &str = "second_round_train.jsonl";
/// [`Artifact::Reranker`](super::Artifact::Reranker): the cross-encoder folder.
pub const RERANKER_DIR: &str = "reranker";
/// [`Artifact::Evaluation`](super::Artifact::Evaluation): the report register reads for the
/// regression guard and `ragd-pipe report` renders.
pub const REPORT_FILE: &str = "report.json";

/// What made the queries and what was thrown away on the way, so the evaluation can say when
/// its result rests on little or filtered-down data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Queries kept, by the strategy that wrote them (`llm`, `ict`, …).
    pub by_strategy: std::collections::BTreeMap<String, usize>,
    /// Each filter's drops, in pipeline order.
    pub filters: Vec<FilterDrop>,
}

/// Queries one filter dropped, of those it saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilterDrop {
    pub stage: String,
    pub filter: String,
    pub dropped: usize,
    pub of: usize,
}

impl Provenance {
    /// The provenance an upstream artifact folder carries, if it has one.
    pub fn read(dir: &Path) -> Option<Self> {
        let text = fs_err::read_to_string(dir.join(PROVENANCE_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        write_json(&dir.join(PROVENANCE_FILE), self)
    }
}

/// A line of `queries.jsonl`: a synthetic query and the passage it should retrieve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRecord {
    /// Stable: the blake3 of the chunk id, strategy and query, 16 hex digits.
    pub id: String,
    pub query: String,
    /// The chunk the query was made from; its passage is the positive.
    pub chunk_id: String,
    pub doc_id: String,
    /// The source document (relative path, or the BEIR `_id`).
    pub source: String,
    /// The text training pulls the query towards: the chunk's passage, or for the Inverse Cloze
    /// Task the passage without the sentence that became the query.
    pub positive: String,
    /// `llm`, `ict` or `headings`.
    pub strategy: String,
}

impl QueryRecord {
    pub fn id_for(chunk_id: &str, strategy: &str, query: &str) -> String {
        let mut hasher = blake3::Hasher::new();
        for part in [chunk_id, strategy, query] {
            hasher.update(part.as_bytes());
            hasher.update(&[0]);
        }
        hasher.finalize().to_hex()[..16].to_owned()
    }
}

/// A passage a training example names besides its positive: a hard negative, or another
/// passage that answers the query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkedPassage {
    pub id: String,
    pub text: String,
}

/// A line of `train.jsonl` and `heldout.jsonl`: ragd's training-data format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingExample {
    pub query: String,
    pub positive: String,
    pub positive_id: String,
    #[serde(default)]
    pub negatives: Vec<LinkedPassage>,
    /// Passages that answer the query too (mine's `continuation_positive`: the chunk after the
    /// positive in its document); training and the held-out qrels count them as right answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_positives: Vec<LinkedPassage>,
    pub source_document: String,
}

impl TrainingExample {
    /// The field left blank, if one is: training skips such a row (the UI's upload check says so).
    pub fn blank_field(&self) -> Option<&'static str> {
        [("query", &self.query), ("positive", &self.positive)]
            .into_iter()
            .find(|(_, value)| value.trim().is_empty())
            .map(|(field, _)| field)
    }

    /// The ids of every passage that answers the query: the positive, then any others (the
    /// relevant set of a held-out query).
    pub fn answer_ids(&self) -> std::collections::HashSet<String> {
        std::iter::once(&self.positive_id)
            .chain(self.extra_positives.iter().map(|p| &p.id))
            .cloned()
            .collect()
    }

    /// What makes two rows repeats of each other: the same query and positive.
    pub fn pair(&self) -> (String, String) {
        (self.query.clone(), self.positive.clone())
    }
}

/// A JSONL log that grows a line per record as long work goes (to follow with `tail -f`, as the
/// dashboard does). A failed write is kept and returned by [`Self::finish`] instead of stopping
/// the work at once.
pub struct LiveLog {
    writer: std::io::BufWriter<fs_err::File>,
    error: Option<std::io::Error>,
}

impl LiveLog {
    pub fn create(path: &Path) -> Result<Self, StageError> {
        Ok(Self {
            writer: std::io::BufWriter::new(fs_err::File::create(path)?),
            error: None,
        })
    }

    pub fn append(&mut self, record: &impl Serialize) {
        use std::io::Write;
        if self.error.is_none()
            && let Err(error) = serde_json::to_writer(&mut self.writer, record)
                .map_err(std::io::Error::from)
                .and_then(|()| self.writer.write_all(b"\n"))
                .and_then(|()| self.writer.flush())
        {
            self.error = Some(error);
        }
    }

    /// The first write error, if any.
    pub fn finish(self) -> Result<(), StageError> {
        match self.error {
            Some(error) => Err(error.into()),
            None => Ok(()),
        }
    }
}

/// The text of a chunk as models see it: its heading path, then its text, as BEIR joins a
/// document's title and text. The heading path is part of what a reader sees of a section.
pub fn passage(chunk: &Chunk) -> String {
    passage_of(&chunk.title, &chunk.text)
}

pub fn passage_of(title: &str, text: &str) -> String {
    if title.is_empty() {
        text.to_owned()
    } else {
        format!("{title} {text}")
    }
}

/// What a saved model's metadata records of the run that made it: the recipe's hash and the
/// stage's cache key (which names every input).
pub fn run_provenance(ctx: &StageContext) -> serde_json::Map<String, serde_json::Value> {
    let mut extra = serde_json::Map::new();
    extra.insert(
        "recipe_hash".to_owned(),
        blake3::hash(ctx.recipe_text.as_bytes())
            .to_hex()
            .to_string()
            .into(),
    );
    extra.insert("cache_key".to_owned(), ctx.key.clone().into());
    extra
}

/// The records of a JSONL file (its non-empty lines), 0 when it cannot be read: for estimates.
pub fn count_lines(path: &Path) -> u64 {
    fs_err::read_to_string(path).map_or(0, |text| {
        text.lines().filter(|l| !l.trim().is_empty()).count() as u64
    })
}

/// Reads a JSONL file; a bad line is an error naming the file and line.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>, StageError> {
    let text = fs_err::read_to_string(path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| StageError::BadRecord {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

/// Writes records as JSONL.
pub fn write_jsonl<T: Serialize>(path: &Path, records: &[T]) -> Result<(), StageError> {
    let mut out = std::io::BufWriter::new(fs_err::File::create(path)?);
    for record in records {
        serde_json::to_writer(&mut out, record)?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// Writes a value as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StageError> {
    fs_err::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}

/// Embeddings of `texts` (a corpus's passages) by the model `reference`, and the encoder for
/// the caller's other texts (see [`encode_cached`]).
pub fn encode_corpus(
    ctx: &StageContext,
    reference: &str,
    texts: &[&str],
    batch_size: usize,
) -> Result<(SentenceEncoder, Embeddings), StageError> {
    let dir = ctx
        .env
        .resolve_model(reference, SENTENCE_TRANSFORMER_FILES)?;
    let encoder = load_encoder_dir(&ctx.env, &dir)?;
    let digest = model_digest(&dir)?;
    let embeddings = encode_cached(ctx, &encoder, &digest, texts, batch_size, "encoding chunks")?;
    Ok((encoder, embeddings))
}

/// The embedding cache's identity of the model in `dir` ([`EmbeddingCache::model_digest`]).
pub fn model_digest(dir: &Path) -> Result<String, StageError> {
    EmbeddingCache::model_digest(dir).map_err(cache_error)
}

/// Embeddings of `texts` by `encoder` (whose files have `model_digest`), from the workdir's embedding
/// cache when an earlier stage or run embedded the same texts with the same model and settings,
/// else encoded under a progress bar called `label` and cached.
pub fn encode_cached(
    ctx: &StageContext,
    encoder: &SentenceEncoder,
    model_digest: &str,
    texts: &[&str],
    batch_size: usize,
    label: &str,
) -> Result<Embeddings, StageError> {
    let mut settings = format!(
        "{:?} {} {} batch {batch_size} max {}",
        encoder.bert().device(),
        crate::model::kernels::implementation().name(),
        crate::model::kernels::matmul_engine(),
        encoder.max_seq_length(),
    );
    // Only bf16 names its engine, and only a model with a passage prompt adds it, so f32 and other
    // models keep their cached vectors.
    if let Some(engine) = encoder.bert().bf16_engine() {
        settings.push_str(&format!(" linear {engine}"));
    }
    let prompt = encoder.prompt(TextRole::Passage);
    if !prompt.is_empty() {
        settings.push_str(&format!(" prompt {prompt:?}"));
    }
    let cache = EmbeddingCache::new(&ctx.shared_dir);
    let key = EmbeddingCache::key(model_digest, &settings, texts);
    if let Some((dim, data)) = cache.load(&key)
        && dim == encoder.dim()
        && data.len() == dim * texts.len()
    {
        // The length tells apart the base's two lines when evaluate scores it at two.
        ctx.info(format!(
            "{label}: reused the embeddings of {} texts at {} tokens from an earlier stage or run",
            texts.len(),
            encoder.max_seq_length()
        ));
        return Ok(Embeddings::new(dim, data));
    }
    let bar = ctx.progress(label, Some(texts.len() as u64));
    let embeddings = encoder
        .encode_as(texts, TextRole::Passage, batch_size, &mut |n| {
            bar.set(n as u64);
        })
        .map_err(model_error)?;
    drop(bar);
    cache
        .save(&key, embeddings.dim(), embeddings.as_slice())
        .map_err(cache_error)?;
    Ok(embeddings)
}

fn cache_error(error: crate::cache::error::CacheError) -> StageError {
    StageError::engine(error)
}

/// Loads a sentence-embedding model folder on the recipe's accelerator, encoding at the recipe's
/// precision.
pub fn load_encoder_dir(env: &StageEnv, dir: &Path) -> Result<SentenceEncoder, StageError> {
    let device = crate::model::device::select(env.recipe.accelerator).map_err(model_error)?;
    SentenceEncoder::load(dir, &device.device)
        .and_then(|encoder| encoder.with_precision(env.recipe.encode_precision))
        .map_err(model_error)
}

/// The cross-encoder `reference` names (a hub id or a folder), resolved and loaded.
pub fn load_cross_encoder(env: &StageEnv, reference: &str) -> Result<CrossEncoder, StageError> {
    let dir = env.resolve_model(reference, SENTENCE_TRANSFORMER_FILES)?;
    load_cross_encoder_dir(env, &dir)
}

/// Loads a cross-encoder folder on the recipe's accelerator, with the limits it was saved with.
pub fn load_cross_encoder_dir(env: &StageEnv, dir: &Path) -> Result<CrossEncoder, StageError> {
    let device = crate::model::device::select(env.recipe.accelerator).map_err(model_error)?;
    CrossEncoder::load(dir, &device.device, LoadOptions::default()).map_err(model_error)
}

/// A model error with its causes, as a stage failure.
pub fn model_error(error: crate::model::error::ModelError) -> StageError {
    StageError::engine(error)
}

/// An index error with its causes, as a stage failure.
pub fn index_error(error: crate::index::IndexError) -> StageError {
    StageError::engine(error)
}
