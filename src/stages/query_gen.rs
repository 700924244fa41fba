//! The query-gen stage: synthetic queries for each chunk, so documents become training pairs.
//!
//! Strategies (a recipe may combine several):
//! - `llm` (the default): an LLM reads each chunk and writes `queries_per_chunk` questions a user
//!   would type, as structured JSON (`{"queries": [...]}`). Answers that do not parse are counted
//!   and never kept. Every answer is cached and journaled ([`crate::llm::cache`]), so an
//!   interrupted run resumes without repeating a call.
//! - `ict`, the Inverse Cloze Task (Lee et al., 2019, "Latent Retrieval for Weakly Supervised
//!   Open Domain Question Answering"): a sentence of the chunk becomes the query and the rest of
//!   the chunk the positive. Needs no language model; it teaches the model the corpus's vocabulary
//!   but not how users ask, so it trains a weaker model than questions written by an LLM.
//! - `headings`: the chunk's heading path as the query, for documentation whose headings read
//!   like what users search for ("Configuring retention > Remote repositories").
//! - `semantic-pairs`: neighbouring chunks of one section as (anchor, positive): the chunk before
//!   is the query, the next one its positive. Needs no language model; it teaches that pieces of
//!   one topic belong together, for users who search with a passage (related sections). Added
//!   to headings and ICT on pyfaq it lowered the real questions' score (0.7888 against 0.8058:
//!   README, Benchmarks): like `ict` it does not teach how users ask.
//!
//! The `llm` strategy's `query_types` mixes questions with short keyword searches: each chunk is
//! asked for one kind or the other by a seeded draw, in the recipe's shares.
//!
//! Output: `queries.jsonl` ([`QueryRecord`]) and `stats.json`.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{self, Estimate, EstimateInput, KEPT_MIN_INPUTS, Sizes, Speeds};
use super::io::{self, CHUNKS_FILE, QUERIES_FILE, QueryRecord};
use super::llm_calls;
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::corpus::{Chunk, sentence_ends};
use crate::llm::{self, LlmSettings};

/// Fresh LLM calls that make a speed worth keeping for estimates: a batch's worth.
const MEASURED_CALLS: usize = 32;

/// Examples of unparseable answers kept in `stats.json`.
const UNPARSEABLE_EXAMPLES: usize = 3;

/// SmolLM2-135M writes the most question-like answers with this plain framing (tried against
/// variants on the bundled docs); words like "search box" make it write URLs, and a JSON
/// example with placeholders gets copied verbatim.
const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

const DEFAULT_PROMPT: &str = "{passage}\n\nWrite {n} questions a user could ask that the text above answers, in the language of the text. Reply in JSON with a list of questions under \"queries\".";

const DEFAULT_KEYWORDS_PROMPT: &str = "{passage}\n\nWrite {n} short keyword searches (a few words, not questions) a user could type to find the text above, in the language of the text. Reply in JSON with a list of searches under \"queries\".";

/// How queries are made.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// An LLM writes questions for the chunk (see the `llm` block and `prompt`).
    Llm,
    /// Inverse Cloze Task: a sentence as the query, the rest of the chunk as the positive.
    Ict,
    /// The chunk's heading path as the query.
    Headings,
    /// Neighbouring chunks of one section: the chunk before as the query, the next as positive.
    #[serde(rename = "semantic-pairs", alias = "semantic_pairs")]
    SemanticPairs,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Self::Llm => "llm",
            Self::Ict => "ict",
            Self::Headings => "headings",
            Self::SemanticPairs => "semantic-pairs",
        }
    }
}

/// The `query_gen:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct QueryGenParams {
    /// How queries are made; several strategies add up.
    #[serde(default = "default_strategies")]
    pub strategies: Vec<Strategy>,
    /// The LLM that writes queries (strategy `llm`).
    #[serde(default)]
    pub llm: LlmSettings,
    /// The system message of the `llm` strategy.
    #[serde(default = "default_system")]
    pub system: String,
    /// The request of the `llm` strategy; `{passage}` is replaced by the chunk (heading path
    /// and text) and `{n}` by `queries_per_chunk`.
    #[serde(default = "default_prompt")]
    pub prompt: String,
    /// A few questions your own users ask (the `llm` strategy shows them to the LLM as examples
    /// of style; they are never kept as training queries, and a query that copies one is dropped).
    /// Write them yourself: questions from a benchmark's test set would leak into training.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
    /// Shares of questions and keyword searches among the chunks the `llm` strategy asks
    /// about (left out: questions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_types: Option<QueryTypes>,
    /// Queries per chunk (for `ict`: sentences taken from it).
    #[serde(default = "default_per_chunk")]
    pub queries_per_chunk: usize,
    /// Use at most this many chunks, a seeded sample (to bound the cost on a big corpus).
    #[serde(default)]
    pub max_chunks: Option<usize>,
    /// Chunks with fewer tokens are skipped: too little to ask about.
    #[serde(default = "default_min_chunk_tokens")]
    pub min_chunk_tokens: usize,
    /// Queries with fewer words are dropped.
    #[serde(default = "default_min_words")]
    pub min_words: usize,
    /// Queries with more words are dropped.
    #[serde(default = "default_max_words")]
    pub max_words: usize,
    /// Queries with fewer characters are dropped (the LLM is also held to it while writing).
    #[serde(default = "default_min_chars")]
    pub min_chars: usize,
    /// Queries with more characters are dropped (the LLM is also held to it while writing).
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
}

/// The `query_types:` block: shares of the kinds of query the `llm` strategy writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct QueryTypes {
    /// Share of questions, as users ask them ("How long are snapshots kept?").
    #[serde(default)]
    pub question: f64,
    /// Share of short keyword searches, as users type them ("snapshot retention days").
    #[serde(default)]
    pub keywords: f64,
    /// The request for keyword searches; `{passage}` and `{n}` as in `prompt`.
    #[serde(default = "default_keywords_prompt")]
    pub keywords_prompt: String,
}

impl QueryTypes {
    /// Whether the chunk `chunk_id` is asked for keyword searches: a draw seeded by the recipe's
    /// seed and the chunk's id, so sampling other chunks or reordering them changes no one's kind.
    fn asks_keywords(&self, seed: u64, chunk_id: &str) -> bool {
        let share = self.keywords / (self.question + self.keywords);
        let hash = blake3::hash(format!("{seed}/{chunk_id}").as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        (u64::from_le_bytes(first) as f64 / u64::MAX as f64) < share
    }
}

impl Default for QueryGenParams {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

fn default_strategies() -> Vec<Strategy> {
    vec![Strategy::Llm]
}
fn default_system() -> String {
    DEFAULT_SYSTEM.to_owned()
}
fn default_prompt() -> String {
    DEFAULT_PROMPT.to_owned()
}
fn default_keywords_prompt() -> String {
    DEFAULT_KEYWORDS_PROMPT.to_owned()
}
fn default_min_chars() -> usize {
    8
}
fn default_max_chars() -> usize {
    200
}
fn default_per_chunk() -> usize {
    2
}
fn default_min_chunk_tokens() -> usize {
    24
}
fn default_min_words() -> usize {
    3
}
fn default_max_words() -> usize {
    40
}

pub struct QueryGen {
    params: QueryGenParams,
    seed: u64,
}

impl StageDef for QueryGen {
    const KIND: &'static str = "query-gen";
    const SECTION: &'static str = "query_gen";
    const ABOUT: &'static str =
        "Write synthetic queries for each chunk (an LLM, or LLM-free strategies).";
    const PRODUCES: Artifact = Artifact::Queries;
    type Params = QueryGenParams;

    fn new(params: QueryGenParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        if params.strategies.is_empty() {
            invalid.push(
                Invalid::new(&["strategies"], "is empty")
                    .with_help("name at least one strategy, e.g. `[ict]`"),
            );
        }
        if params.queries_per_chunk == 0 || params.queries_per_chunk > 20 {
            invalid.push(Invalid::new(
                &["queries_per_chunk"],
                "must be between 1 and 20",
            ));
        }
        if params.min_words > params.max_words {
            invalid.push(Invalid::new(
                &["min_words"],
                format!("is above `max_words` ({})", params.max_words),
            ));
        }
        if params.min_chars > params.max_chars || params.max_chars > 2000 {
            invalid.push(Invalid::new(
                &["max_chars"],
                format!(
                    "must be at least `min_chars` ({}) and at most 2000",
                    params.min_chars
                ),
            ));
        }
        if params.strategies.contains(&Strategy::Llm) {
            invalid.extend(llm_calls::check(&params.llm, &["llm"]));
            if !params.prompt.contains("{passage}") {
                invalid.push(
                    Invalid::new(&["prompt"], "does not contain `{passage}`")
                        .with_help("the chunk's text is put where `{passage}` stands"),
                );
            }
        }
        if let Some(types) = &params.query_types {
            let share_ok = |v: f64| v.is_finite() && v >= 0.0;
            if !share_ok(types.question) || !share_ok(types.keywords) {
                invalid.push(Invalid::new(
                    &["query_types"],
                    "shares must be numbers of at least 0",
                ));
            } else if types.question + types.keywords <= 0.0 {
                invalid.push(
                    Invalid::new(&["query_types"], "has no share above 0")
                        .with_help("e.g. `{question: 3, keywords: 1}` for a quarter of keywords"),
                );
            }
            if !types.keywords_prompt.contains("{passage}") {
                invalid.push(Invalid::new(
                    &["query_types", "keywords_prompt"],
                    "does not contain `{passage}`",
                ));
            }
            if !params.strategies.contains(&Strategy::Llm) {
                invalid.push(
                    Invalid::new(&["query_types"], "applies to the `llm` strategy only")
                        .with_help("add `llm` to `strategies`, or leave `query_types` out"),
                );
            }
        }
        for (i, example) in params.examples.iter().enumerate() {
            if example.trim().is_empty() {
                invalid.push(Invalid::new(&["examples", &i.to_string()], "is empty"));
            }
        }
        if params.max_chunks == Some(0) {
            invalid.push(Invalid::new(
                &["max_chunks"],
                "must be at least 1 (or left out for all chunks)",
            ));
        }
        if invalid.is_empty() {
            Ok(Self {
                params,
                seed: env.seed,
            })
        } else {
            Err(invalid)
        }
    }
}

impl Stage for QueryGen {
    /// 4: writes `provenance.json` (queries by strategy, drops by filter).
    fn version(&self) -> u32 {
        4
    }

    fn inputs(&self) -> Vec<Input> {
        vec![Input {
            artifact: Artifact::Chunks,
            required: true,
            instead: None,
        }]
    }

    fn params(&self) -> serde_json::Value {
        let mut params = serde_json::to_value(&self.params).unwrap_or_default();
        params["llm"] = serde_json::to_value(self.params.llm.canonical()).unwrap_or_default();
        params["seed"] = self.seed.into();
        params
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        if self.params.strategies.contains(&Strategy::Llm) {
            Ok(vec![llm_calls::external(&self.params.llm, env)?])
        } else {
            Ok(Vec::new())
        }
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let chunks = input.sizes.chunks.unwrap_or(0);
        let used = self
            .params
            .max_chunks
            .map_or(chunks, |max| chunks.min(max as u64));
        let per_chunk = input.speeds.kept(&self.kept_label()).unwrap_or_else(|| {
            let asked = self.params.queries_per_chunk as f64;
            self.params
                .strategies
                .iter()
                .map(|strategy| match strategy {
                    // SmolLM2 on the quickstart: 215 kept of 452 asked (Qwen2.5-Coder-0.5B on
                    // pyfaq: 1,076 of 1,200).
                    Strategy::Llm => asked / 2.,
                    Strategy::Ict => asked,
                    // Not every chunk has a heading of its own or a predecessor.
                    Strategy::Headings | Strategy::SemanticPairs => 0.5,
                })
                .sum()
        });
        let queries = (used as f64 * per_chunk).round() as u64;
        let mut estimate = Estimate::brief(Sizes {
            queries: Some(queries),
            ..input.sizes
        });
        if self.params.strategies.contains(&Strategy::Llm) {
            let llm = estimate::llm_calls(input, &self.params.llm, used)?;
            estimate.seconds += llm.seconds;
            estimate.peak_bytes = llm.peak_bytes;
            estimate.basis = llm.basis;
        }
        Ok(estimate)
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let chunks: Vec<Chunk> = io::read_jsonl(&ctx.input(Artifact::Chunks)?.join(CHUNKS_FILE))?;
        let mut stats = QueryGenStats {
            chunks: chunks.len(),
            ..QueryGenStats::default()
        };
        let selected = self.select_chunks(&chunks, &mut stats);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut records = Vec::new();
        // Only `semantic-pairs` needs each chunk's predecessor.
        let previous = if self.params.strategies.contains(&Strategy::SemanticPairs) {
            previous_in_section(&chunks)
        } else {
            BTreeMap::new()
        };
        for strategy in &self.params.strategies {
            let llm_answers = match strategy {
                Strategy::Llm => Some(self.ask_llm(ctx, &selected, &mut stats)?),
                Strategy::Ict | Strategy::Headings | Strategy::SemanticPairs => None,
            };
            for (n, chunk) in selected.iter().enumerate() {
                let made = match strategy {
                    Strategy::Llm => llm_answers
                        .as_ref()
                        .and_then(|answers| answers.get(n))
                        .cloned()
                        .unwrap_or_default(),
                    Strategy::Ict => ict(chunk, self.params.queries_per_chunk, &mut rng),
                    Strategy::Headings => headings(chunk),
                    Strategy::SemanticPairs => semantic_pair(chunk, &previous),
                };
                for (query, positive) in made {
                    self.keep(&mut records, &mut stats, chunk, *strategy, query, positive);
                }
            }
        }
        io::write_jsonl(&ctx.out_dir.join(QUERIES_FILE), &records)?;
        stats.queries = records.len();
        let written = stats.queries + stats.dropped.values().sum::<usize>();
        io::Provenance {
            by_strategy: stats.by_strategy.clone(),
            filters: stats
                .dropped
                .iter()
                .map(|(filter, &dropped)| io::FilterDrop {
                    stage: Self::KIND.to_owned(),
                    filter: filter.clone(),
                    dropped,
                    of: written,
                })
                .collect(),
        }
        .write(&ctx.out_dir)?;
        if stats.chunks_used >= KEPT_MIN_INPUTS {
            Speeds::open(&ctx.env.hub.cache_dir).record_kept(
                &self.kept_label(),
                stats.queries as f64 / stats.chunks_used as f64,
            );
        }
        io::write_json(&ctx.out_dir.join("stats.json"), &stats)?;
        ctx.table(&stats.table());
        if records.is_empty() {
            return Err(StageError::Failed(
                "no query was produced; see the table above for what was dropped".to_owned(),
            ));
        }
        Ok(StageOutcome {
            summary: serde_json::to_value(&stats)?,
        })
    }
}

/// How LLM answers open when the model talks about the question instead of asking it.
const PREAMBLES: &[&str] = &[
    "here is",
    "here are",
    "here's",
    "sure",
    "certainly",
    "question:",
    "query:",
    "q:",
    "a question",
    "the question",
    "as an ai",
];

/// Words of a query copied in a row from the chunk that make it a copy, not a question.
const COPIED_WORDS: usize = 8;

/// Lowercased words, punctuation stripped, for comparing texts.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl QueryGen {
    /// What the number of queries kept per chunk depends on: the strategies, how many are
    /// asked, and the LLM that writes them.
    fn kept_label(&self) -> String {
        let strategies: Vec<&str> = self.params.strategies.iter().map(|s| s.name()).collect();
        let llm = if self.params.strategies.contains(&Strategy::Llm) {
            format!(" {}", self.params.llm.model().unwrap_or("server default"))
        } else {
            String::new()
        };
        format!(
            "query-gen {} x{}{llm}",
            strategies.join("+"),
            self.params.queries_per_chunk
        )
    }

    /// Why an LLM query is no use, if it is none: a preamble instead of a question, a copy of
    /// the chunk's own sentence (it teaches exact lookup, as ICT does, not how users ask), or a
    /// copy of a style example.
    fn llm_fault(&self, chunk: &Chunk, query: &str) -> Option<&'static str> {
        let lower = query.to_lowercase();
        if PREAMBLES.iter().any(|p| lower.starts_with(p)) {
            return Some("llm: a preamble, not a query");
        }
        if self
            .params
            .examples
            .iter()
            .any(|e| words(e) == words(query))
        {
            return Some("llm: copies a style example");
        }
        let query_words = words(query);
        let copies = |text: &str| {
            let text = words(text);
            query_words
                .windows(COPIED_WORDS)
                .any(|run| text.windows(COPIED_WORDS).any(|w| w == run))
        };
        if copies(&chunk.text) {
            return Some("llm: copies the chunk's text");
        }
        let instructions = |prompt: &str| {
            prompt
                .replace("{passage}", " ")
                .replace("{n}", &self.params.queries_per_chunk.to_string())
        };
        let keywords_prompt = self.params.query_types.as_ref().map(|t| &t.keywords_prompt);
        if copies(&instructions(&self.params.prompt))
            || keywords_prompt.is_some_and(|p| copies(&instructions(p)))
            || copies(&self.params.system)
        {
            return Some("llm: copies the instructions");
        }
        None
    }

    /// The chunks to make queries for: long enough, and a seeded sample when `max_chunks` is set.
    fn select_chunks<'a>(&self, chunks: &'a [Chunk], stats: &mut QueryGenStats) -> Vec<&'a Chunk> {
        let mut selected: Vec<&Chunk> = chunks
            .iter()
            .filter(|c| c.n_tokens >= self.params.min_chunk_tokens)
            .collect();
        stats.skipped_short_chunks = chunks.len() - selected.len();
        if let Some(max) = self.params.max_chunks
            && selected.len() > max
        {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0x6368_756e_6b73);
            selected.shuffle(&mut rng);
            selected.truncate(max);
            // Back to corpus order, so the output does not depend on the shuffle's order.
            let order: BTreeMap<&str, usize> = chunks
                .iter()
                .enumerate()
                .map(|(i, c)| (c.id.as_str(), i))
                .collect();
            selected.sort_by_key(|c| order[c.id.as_str()]);
        }
        stats.chunks_used = selected.len();
        selected
    }

    /// Applies the length bounds and per-chunk de-duplication, then records the query.
    fn keep(
        &self,
        records: &mut Vec<QueryRecord>,
        stats: &mut QueryGenStats,
        chunk: &Chunk,
        strategy: Strategy,
        query: String,
        positive: String,
    ) {
        let query = query.split_whitespace().collect::<Vec<_>>().join(" ");
        let words = query.split_whitespace().count();
        let chars = query.chars().count();
        // A semantic pair's anchor is a whole chunk: only the query bounds below apply.
        let bounded = strategy != Strategy::SemanticPairs;
        let reason = if words < self.params.min_words || chars < self.params.min_chars {
            Some("too short")
        } else if bounded && (words > self.params.max_words || chars > self.params.max_chars) {
            Some("too long")
        } else if records
            .iter()
            .rev()
            .take_while(|r| r.chunk_id == chunk.id)
            .any(|r| r.query.eq_ignore_ascii_case(&query))
        {
            Some("repeated for the same chunk")
        } else if strategy == Strategy::Llm {
            self.llm_fault(chunk, &query)
        } else {
            None
        };
        if let Some(reason) = reason {
            *stats.dropped.entry(reason.to_owned()).or_default() += 1;
            return;
        }
        *stats
            .by_strategy
            .entry(strategy.name().to_owned())
            .or_default() += 1;
        records.push(QueryRecord {
            id: QueryRecord::id_for(&chunk.id, strategy.name(), &query),
            query,
            chunk_id: chunk.id.clone(),
            doc_id: chunk.doc_id.clone(),
            source: chunk.source.clone(),
            positive,
            strategy: strategy.name().to_owned(),
        });
    }
}

/// The JSON schema LLM answers must follow.
fn answer_schema(params: &QueryGenParams) -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "queries": {
                "type": "array",
                "items": {
                    "type": "string",
                    "minLength": params.min_chars,
                    "maxLength": params.max_chars,
                },
                "minItems": 1,
                "maxItems": params.queries_per_chunk,
            }
        },
        "required": ["queries"],
        "additionalProperties": false,
    })
}

/// The requests the `llm` strategy sends for `chunks` (also what `bench llm` times).
pub fn llm_requests(params: &QueryGenParams, chunks: &[&Chunk], seed: u64) -> Vec<llm::Request> {
    let schema = answer_schema(params);
    chunks
        .iter()
        .map(|chunk| {
            let template = match &params.query_types {
                Some(types) if types.asks_keywords(seed, &chunk.id) => &types.keywords_prompt,
                _ => &params.prompt,
            };
            let mut prompt = template
                .replace("{passage}", &io::passage(chunk))
                .replace("{n}", &params.queries_per_chunk.to_string());
            if !params.examples.is_empty() {
                prompt.push_str(
                    "\n\nUsers of these documents ask questions like these (about other passages):",
                );
                for example in &params.examples {
                    prompt.push_str("\n- ");
                    prompt.push_str(example.trim());
                }
            }
            params.llm.request(
                Some(params.system.clone()),
                prompt,
                Some(schema.clone()),
                seed,
            )
        })
        .collect()
}

impl QueryGen {
    /// Asks the LLM for each chunk's queries: per chunk, its (query, positive) pairs; an answer
    /// that does not parse gives none and is counted.
    fn ask_llm(
        &self,
        ctx: &StageContext,
        chunks: &[&Chunk],
        stats: &mut QueryGenStats,
    ) -> Result<Vec<Vec<(String, String)>>, StageError> {
        let settings = &self.params.llm;
        let backend = llm_calls::connect(settings, &ctx.env, &ctx.cancel)?;
        let requests = llm_requests(&self.params, chunks, self.seed);
        ctx.info(format!(
            "asking {} ({}) for queries on {} chunks, {} at a time",
            settings.model().unwrap_or_default(),
            backend.name(),
            requests.len(),
            backend.concurrency()
        ));
        let (answers, calls) = llm_calls::complete_with_progress(
            ctx,
            "writing queries (llm)",
            backend.as_ref(),
            &requests,
        )?;
        // Enough fresh calls to say how fast this LLM answers here, for later estimates.
        if calls.calls >= MEASURED_CALLS {
            Speeds::open(&ctx.env.hub.cache_dir)
                .record_llm(settings, calls.seconds / calls.calls as f64);
        }
        let mut llm_stats = LlmStats {
            keyword_chunks: self.params.query_types.as_ref().map_or(0, |types| {
                chunks
                    .iter()
                    .filter(|c| types.asks_keywords(self.seed, &c.id))
                    .count()
            }),
            model: backend.identity(),
            calls: calls.calls,
            cached: calls.cached,
            calls_per_second: calls.calls_per_second(),
            ..LlmStats::default()
        };
        let pairs = chunks
            .iter()
            .zip(&answers)
            .map(|(chunk, answer)| match parse_queries(answer) {
                Some(mut queries) => {
                    if queries.len() > self.params.queries_per_chunk {
                        llm_stats.beyond_queries_per_chunk +=
                            queries.len() - self.params.queries_per_chunk;
                        queries.truncate(self.params.queries_per_chunk);
                    }
                    let positive = io::passage(chunk);
                    queries.into_iter().map(|q| (q, positive.clone())).collect()
                }
                None => {
                    llm_stats.unparseable += 1;
                    if llm_stats.unparseable_examples.len() < UNPARSEABLE_EXAMPLES {
                        llm_stats
                            .unparseable_examples
                            .push(answer.chars().take(200).collect());
                    }
                    Vec::new()
                }
            })
            .collect();
        stats.llm = Some(llm_stats);
        Ok(pairs)
    }
}

/// The queries of an answer `{"queries": [...]}`; None when it is not that JSON.
fn parse_queries(answer: &str) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct Answer {
        queries: Vec<String>,
    }
    serde_json::from_str::<Answer>(answer.trim())
        .ok()
        .map(|a| a.queries)
}

/// Up to `n` (query sentence, rest of the chunk) pairs. The sentence is removed from the positive
/// (always, not ORQA's 90%): keeping it would teach exact-match lookup, not retrieval.
fn ict(chunk: &Chunk, n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<(String, String)> {
    let text = &chunk.text;
    let mut sentences = Vec::new();
    let mut start = 0;
    for end in sentence_ends(text) {
        let sentence = text[start..end].trim();
        if !sentence.is_empty() {
            sentences.push((start, end, sentence));
        }
        start = end;
    }
    if sentences.len() < 2 {
        return Vec::new();
    }
    let mut picks: Vec<usize> = (0..sentences.len()).collect();
    picks.shuffle(rng);
    picks
        .into_iter()
        .take(n)
        .map(|i| {
            let (start, end, sentence) = sentences[i];
            let rest = format!("{} {}", text[..start].trim_end(), text[end..].trim_start());
            (
                sentence.to_owned(),
                io::passage_of(&chunk.title, rest.trim()),
            )
        })
        .collect()
}

/// The heading path as one query (`A > B` becomes `A: B`), for chunks under a heading.
fn headings(chunk: &Chunk) -> Vec<(String, String)> {
    if chunk.title.is_empty() {
        return Vec::new();
    }
    let query = chunk.title.split(" > ").collect::<Vec<_>>().join(": ");
    // The positive leaves the heading out: it would be the query itself.
    vec![(query, chunk.text.clone())]
}

/// For each chunk id, the chunk just before it in the same document and section (heading path):
/// the anchors of `semantic-pairs`.
fn previous_in_section(chunks: &[Chunk]) -> BTreeMap<&str, &Chunk> {
    chunks
        .windows(2)
        .filter(|w| w[0].doc_id == w[1].doc_id && w[0].title == w[1].title)
        .map(|w| (w[1].id.as_str(), &w[0]))
        .collect()
}

/// The chunk before `chunk` in its section as the query, `chunk` as the positive.
fn semantic_pair(chunk: &Chunk, previous: &BTreeMap<&str, &Chunk>) -> Vec<(String, String)> {
    previous
        .get(chunk.id.as_str())
        .map(|anchor| vec![(anchor.text.clone(), io::passage(chunk))])
        .unwrap_or_default()
}

/// What query generation did, for `stats.json` and the table.
#[derive(Debug, Default, Serialize)]
struct QueryGenStats {
    chunks: usize,
    skipped_short_chunks: usize,
    chunks_used: usize,
    queries: usize,
    by_strategy: BTreeMap<String, usize>,
    dropped: BTreeMap<String, usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    llm: Option<LlmStats>,
}

/// What the `llm` strategy cost and how well its answers parsed.
#[derive(Debug, Default, Serialize)]
struct LlmStats {
    model: String,
    /// Calls made in this run.
    calls: usize,
    /// Answers found in the response cache.
    cached: usize,
    calls_per_second: f64,
    /// Answers that were not `{"queries": [...]}` JSON: none of their text is kept.
    unparseable: usize,
    unparseable_examples: Vec<String>,
    /// Queries past `queries_per_chunk` in an answer, cut off.
    beyond_queries_per_chunk: usize,
    /// Chunks asked for keyword searches instead of questions (`query_types`).
    keyword_chunks: usize,
}

impl QueryGenStats {
    fn table(&self) -> Table {
        let mut rows = vec![
            vec!["chunks".to_owned(), self.chunks.to_string()],
            vec![
                "skipped: too short".to_owned(),
                self.skipped_short_chunks.to_string(),
            ],
            vec!["chunks used".to_owned(), self.chunks_used.to_string()],
        ];
        if let Some(llm) = &self.llm {
            rows.push(vec![
                "llm calls (cached)".to_owned(),
                format!("{} ({})", llm.calls, llm.cached),
            ]);
            // Answers all from the cache took no calls: no speed to show.
            if llm.calls > 0 {
                rows.push(vec![
                    "llm calls/s".to_owned(),
                    format!("{:.2}", llm.calls_per_second),
                ]);
            }
            rows.push(vec![
                "llm answers unparseable".to_owned(),
                llm.unparseable.to_string(),
            ]);
            if llm.keyword_chunks > 0 {
                rows.push(vec![
                    "llm chunks asked for keywords".to_owned(),
                    llm.keyword_chunks.to_string(),
                ]);
            }
        }
        for (strategy, n) in &self.by_strategy {
            rows.push(vec![format!("queries: {strategy}"), n.to_string()]);
        }
        for (reason, n) in &self.dropped {
            rows.push(vec![format!("dropped: {reason}"), n.to_string()]);
        }
        rows.push(vec!["queries kept".to_owned(), self.queries.to_string()]);
        Table {
            title: "queries".to_owned(),
            columns: vec!["what".to_owned(), "count".to_owned()],
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk {
            id: "c1".into(),
            doc_id: "d".into(),
            source: "d.md".into(),
            title: "Guide > Retention".into(),
            text: text.into(),
            n_tokens: 50,
        }
    }

    #[test]
    fn ict_takes_a_sentence_out_of_the_positive() {
        let c = chunk(
            "Snapshots are kept for thirty days. Remote repositories prune weekly. Local ones prune daily.",
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let pairs = ict(&c, 2, &mut rng);
        assert_eq!(pairs.len(), 2);
        for (query, positive) in &pairs {
            assert!(!positive.contains(query.as_str()), "{query} in {positive}");
            assert!(positive.starts_with("Guide > Retention "));
            assert!(c.text.contains(query.as_str()));
        }
        assert_ne!(pairs[0].0, pairs[1].0);
    }

    #[test]
    fn llm_answers_parse_or_count_as_unparseable() {
        assert_eq!(
            parse_queries(" {\"queries\": [\"how long are snapshots kept\", \"x\"]}\n"),
            Some(vec![
                "how long are snapshots kept".to_owned(),
                "x".to_owned()
            ])
        );
        for bad in [
            "",
            "queries: how long",
            r#"{"queries": "how long"}"#,
            r#"{"queries": ["how long""#,
            r#"["how long"]"#,
        ] {
            assert!(parse_queries(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ict_needs_two_sentences() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        assert!(ict(&chunk("Only one sentence here."), 2, &mut rng).is_empty());
    }

    #[test]
    fn headings_become_queries() {
        let pairs = headings(&chunk("Body."));
        assert_eq!(
            pairs,
            vec![("Guide: Retention".to_owned(), "Body.".to_owned())]
        );
    }

    /// Preambles, copies of the chunk's sentences and copies of style examples are dropped
    /// from LLM queries and counted by reason; other strategies are left alone.
    #[test]
    fn llm_preambles_and_copies_are_dropped_and_counted() {
        let stage = QueryGen {
            params: QueryGenParams {
                examples: vec!["How do I restore a deleted file?".to_owned()],
                ..QueryGenParams::default()
            },
            seed: 1,
        };
        let c = chunk(
            "Snapshots are kept for thirty days before the nightly job removes them from the remote repository.",
        );
        let (mut records, mut stats) = (Vec::new(), QueryGenStats::default());
        for query in [
            "Here is a question about snapshot retention",
            "Sure! How long are snapshots kept?",
            "snapshots are kept for thirty days before the nightly job removes them",
            "How do I restore a deleted file?",
            "Write 2 questions a user could ask that the text above answers.",
            "How long does the remote repository keep snapshots?",
        ] {
            stage.keep(
                &mut records,
                &mut stats,
                &c,
                Strategy::Llm,
                query.to_owned(),
                c.text.clone(),
            );
        }
        // The same copied sentence is fine as an ICT query.
        stage.keep(
            &mut records,
            &mut stats,
            &c,
            Strategy::Ict,
            "Snapshots are kept for thirty days before the nightly job removes them.".to_owned(),
            String::new(),
        );
        let kept: Vec<&str> = records.iter().map(|r| r.query.as_str()).collect();
        assert_eq!(
            kept,
            [
                "How long does the remote repository keep snapshots?",
                "Snapshots are kept for thirty days before the nightly job removes them."
            ]
        );
        assert_eq!(stats.dropped["llm: a preamble, not a query"], 2);
        assert_eq!(stats.dropped["llm: copies the chunk's text"], 1);
        assert_eq!(stats.dropped["llm: copies a style example"], 1);
        assert_eq!(stats.dropped["llm: copies the instructions"], 1);
    }

    #[test]
    fn style_examples_go_into_the_prompt() {
        let params = QueryGenParams {
            examples: vec!["Why is my backup slow?".to_owned()],
            ..QueryGenParams::default()
        };
        let c = chunk("Backups run at night.");
        let requests = llm_requests(&params, &[&c], 3);
        assert!(
            requests[0].prompt.contains("- Why is my backup slow?"),
            "{}",
            requests[0].prompt
        );
        assert!(requests[0].prompt.contains("Backups run at night."));
        assert!(
            !llm_requests(&QueryGenParams::default(), &[&c], 3)[0]
                .prompt
                .contains("questions like these")
        );
    }

    #[test]
    fn semantic_pairs_join_neighbours_of_one_section_only() {
        let piece = |id: &str, doc: &str, title: &str| Chunk {
            id: id.into(),
            doc_id: doc.into(),
            title: title.into(),
            text: format!("text of {id}"),
            ..chunk("")
        };
        let chunks = [
            piece("a1", "d1", "Guide > Retention"),
            piece("a2", "d1", "Guide > Retention"),
            piece("b1", "d1", "Guide > Pruning"),
            piece("c1", "d2", "Guide > Pruning"),
        ];
        let previous = previous_in_section(&chunks);
        assert_eq!(
            semantic_pair(&chunks[1], &previous),
            vec![(
                "text of a1".to_owned(),
                "Guide > Retention text of a2".to_owned()
            )]
        );
        // A new section or a new document starts without an anchor.
        for first in [&chunks[0], &chunks[2], &chunks[3]] {
            assert!(semantic_pair(first, &previous).is_empty(), "{}", first.id);
        }
        // The anchor is a whole chunk: `max_words` does not drop it.
        let stage = QueryGen {
            params: QueryGenParams {
                max_words: 3,
                ..QueryGenParams::default()
            },
            seed: 1,
        };
        let (mut records, mut stats) = (Vec::new(), QueryGenStats::default());
        let long = "one two three four five six".to_owned();
        stage.keep(
            &mut records,
            &mut stats,
            &chunks[1],
            Strategy::SemanticPairs,
            long,
            "positive".to_owned(),
        );
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].strategy, "semantic-pairs");
    }

    #[test]
    fn query_types_ask_a_seeded_share_of_chunks_for_keywords() {
        let types = QueryTypes {
            question: 3.0,
            keywords: 1.0,
            keywords_prompt: default_keywords_prompt(),
        };
        let params = QueryGenParams {
            query_types: Some(types.clone()),
            ..QueryGenParams::default()
        };
        let chunks: Vec<Chunk> = (0..400)
            .map(|i| Chunk {
                id: format!("c{i}"),
                ..chunk("Backups run at night.")
            })
            .collect();
        let refs: Vec<&Chunk> = chunks.iter().collect();
        let requests = llm_requests(&params, &refs, 3);
        let keywords = requests
            .iter()
            .filter(|r| r.prompt.contains("short keyword searches"))
            .count();
        // A quarter, within what chance allows for 400 draws (sd ~ 8.7).
        assert!((70..=130).contains(&keywords), "{keywords} of 400");
        for (chunk, request) in chunks.iter().zip(&requests) {
            assert_eq!(
                request.prompt.contains("short keyword searches"),
                types.asks_keywords(3, &chunk.id)
            );
        }
        // Without `query_types`, every chunk is asked for questions.
        assert!(
            llm_requests(&QueryGenParams::default(), &refs, 3)
                .iter()
                .all(|r| !r.prompt.contains("short keyword searches"))
        );
        // Only keywords when the question share is 0.
        let all_keywords = QueryTypes {
            question: 0.0,
            ..types
        };
        assert!(chunks.iter().all(|c| all_keywords.asks_keywords(3, &c.id)));
    }

    #[test]
    fn query_types_without_a_share_or_the_llm_strategy_are_invalid() {
        let env = RecipeEnv {
            dir: ".".into(),
            name: "t".into(),
            base_model: "x/y".into(),
            seed: 1,
            accelerator: crate::model::device::Accelerator::Cpu,
            encode_precision: Default::default(),
        };
        let invalid = |yaml: &str| -> Vec<String> {
            let params: QueryGenParams = serde_yaml::from_str(yaml).expect("parses");
            match QueryGen::new(params, &env) {
                Ok(_) => Vec::new(),
                Err(invalid) => invalid.into_iter().map(|i| i.message).collect(),
            }
        };
        assert!(invalid("query_types: {question: 2, keywords: 1}").is_empty());
        assert_eq!(invalid("query_types: {question: 0, keywords: 0}").len(), 1);
        assert_eq!(invalid("query_types: {question: -1, keywords: 1}").len(), 1);
        assert_eq!(
            invalid("strategies: [ict]\nquery_types: {keywords: 1}").len(),
            1
        );
    }
}
