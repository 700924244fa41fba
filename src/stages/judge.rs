//! The judge stage: drops bad synthetic queries and counts every drop.
//!
//! Filters, each optional, cheapest first so the costly ones see fewer queries:
//! 1. `dedupe`: the same query twice (after normalising case and punctuation) anywhere, or a
//!    near-copy (word-set Jaccard ≥ `threshold`) of another query of the same chunk.
//! 2. `round_trip`: consistency filtering (Alberti et al., 2019; Promptagator): keep a query only
//!    if its own chunk ranks within `top_k` for it, with BM25 and/or the base model. A query its
//!    chunk does not answer rarely finds that chunk.
//! 3. `llm_judge` (off by default): an LLM reads the chunk and the query and answers
//!    `{"answerable": bool, "reason": string}`; a query is kept only on a parsed `true`, so an
//!    answer that does not parse is a drop (counted on its own), never a pass.
//!
//! Output: `queries.jsonl` (kept), `dropped.jsonl` (each with its filter and why) and
//! `summary.json` (counts and examples per filter).

use std::collections::{BTreeMap, HashMap, HashSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::estimate::{self, Estimate, EstimateInput, KEPT_MIN_INPUTS, PROCESS_BYTES, Speeds};
use super::io::{self, CHUNKS_FILE, QUERIES_FILE, QueryRecord};
use super::llm_calls;
use super::{
    Artifact, External, Input, Invalid, RecipeEnv, Stage, StageContext, StageDef, StageEnv,
    StageError, StageOutcome, Table,
};
use crate::corpus::Chunk;
use crate::index::{Bm25Index, DenseIndex};
use crate::llm::{self, LlmSettings};
use crate::model::prompts::TextRole;

/// Examples of dropped queries kept per filter in `summary.json`.
const EXAMPLES_PER_FILTER: usize = 5;

const DEFAULT_JUDGE_SYSTEM: &str =
    "You check search queries against the passage they were written for.";

const DEFAULT_JUDGE_PROMPT: &str = "Passage:\n\"\"\"\n{passage}\n\"\"\"\n\nQuestion: {query}\n\nCan this passage alone answer the question? Answer in JSON: {\"answerable\": true or false, \"reason\": \"one short sentence\"}";

/// Which retrieval a round trip uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoundTripMethod {
    Bm25,
    Dense,
    /// Kept when either finds the chunk.
    Either,
    /// Kept only when both find it.
    Both,
}

/// `judge.round_trip`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RoundTrip {
    /// BM25, the base model (`dense`), `either` or `both`.
    #[serde(default = "default_method")]
    pub method: RoundTripMethod,
    /// The query's chunk must rank within this many results.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_method() -> RoundTripMethod {
    RoundTripMethod::Either
}
fn default_top_k() -> usize {
    20
}

/// `judge.too_easy`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TooEasy {
    /// How many times the runner-up's BM25 score the query's own chunk must score to be too
    /// easy (its words name the chunk outright; a contrastive loss learns nothing from it).
    #[serde(default = "default_margin")]
    pub margin: f64,
}

fn default_margin() -> f64 {
    3.0
}

/// `judge.dedupe`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Dedupe {
    /// Two queries of one chunk whose word sets overlap this much (Jaccard) are near-copies.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
}

fn default_threshold() -> f64 {
    0.8
}

/// `judge.llm_judge`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LlmJudge {
    /// The judging LLM.
    #[serde(default)]
    pub llm: LlmSettings,
    /// The system message.
    #[serde(default = "default_judge_system")]
    pub system: String,
    /// The request; `{passage}` is replaced by the chunk and `{query}` by the query.
    #[serde(default = "default_judge_prompt")]
    pub prompt: String,
}

fn default_judge_system() -> String {
    DEFAULT_JUDGE_SYSTEM.to_owned()
}
fn default_judge_prompt() -> String {
    DEFAULT_JUDGE_PROMPT.to_owned()
}

/// The `judge:` section. Leave a filter out with `null`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct JudgeParams {
    /// Drop repeated and near-identical queries.
    #[serde(default = "default_dedupe")]
    pub dedupe: Option<Dedupe>,
    /// Keep a query only if its own chunk ranks within `top_k` for it.
    #[serde(default = "default_round_trip")]
    pub round_trip: Option<RoundTrip>,
    /// Drop queries BM25 finds too easily to teach anything: their own chunk first, scoring at
    /// least `margin` times the runner-up (off unless given; `too_easy: {}` for the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub too_easy: Option<TooEasy>,
    /// Ask an LLM whether the chunk answers each query (off unless given; `llm_judge: {}` for
    /// the defaults).
    #[serde(default)]
    pub llm_judge: Option<LlmJudge>,
    /// Texts per batch when encoding with the base model.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_dedupe() -> Option<Dedupe> {
    Some(Dedupe {
        threshold: default_threshold(),
    })
}
fn default_round_trip() -> Option<RoundTrip> {
    Some(RoundTrip {
        method: default_method(),
        top_k: default_top_k(),
    })
}
fn default_batch() -> usize {
    64
}

impl Default for JudgeParams {
    fn default() -> Self {
        crate::serde_defaults()
    }
}

pub struct Judge {
    params: JudgeParams,
    base_model: String,
    seed: u64,
}

impl StageDef for Judge {
    const KIND: &'static str = "judge";
    const SECTION: &'static str = "judge";
    const ABOUT: &'static str =
        "Drop bad queries (duplicates, round-trip failures) and count every drop.";
    const PRODUCES: Artifact = Artifact::Queries;
    type Params = JudgeParams;

    fn new(params: JudgeParams, env: &RecipeEnv) -> Result<Self, Vec<Invalid>> {
        let mut invalid = Vec::new();
        if let Some(d) = &params.dedupe
            && !(d.threshold > 0.0 && d.threshold <= 1.0)
        {
            invalid.push(Invalid::new(&["dedupe", "threshold"], "must be in (0, 1]"));
        }
        if let Some(t) = &params.too_easy
            && (t.margin.is_nan() || t.margin <= 1.0)
        {
            invalid.push(Invalid::new(&["too_easy", "margin"], "must be above 1"));
        }
        if let Some(r) = &params.round_trip
            && r.top_k == 0
        {
            invalid.push(Invalid::new(&["round_trip", "top_k"], "must be at least 1"));
        }
        if params.batch_size == 0 {
            invalid.push(Invalid::new(&["batch_size"], "must be at least 1"));
        }
        if let Some(judge) = &params.llm_judge {
            invalid.extend(llm_calls::check(&judge.llm, &["llm_judge", "llm"]));
            for placeholder in ["{passage}", "{query}"] {
                if !judge.prompt.contains(placeholder) {
                    invalid.push(Invalid::new(
                        &["llm_judge", "prompt"],
                        format!("does not contain `{placeholder}`"),
                    ));
                }
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

impl Stage for Judge {
    /// 3: carries `provenance.json` on, with its own filters' drops.
    fn version(&self) -> u32 {
        3
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
        if let Some(judge) = &self.params.llm_judge {
            params["llm_judge"]["llm"] =
                serde_json::to_value(judge.llm.canonical()).unwrap_or_default();
            params["seed"] = self.seed.into();
        }
        params
    }

    fn estimate(&self, input: &EstimateInput) -> Result<Estimate, StageError> {
        let queries = input.sizes.queries.unwrap_or(0);
        let mut estimate = if self.dense() {
            let chunks = input.sizes.chunks.unwrap_or(0);
            estimate::encoding(input, &self.base_model, chunks, queries)?
        } else {
            Estimate::brief(input.sizes)
        };
        if let Some(judge) = &self.params.llm_judge {
            let llm = estimate::llm_calls(input, &judge.llm, queries)?;
            estimate.seconds += llm.seconds;
            estimate.peak_bytes += llm.peak_bytes - PROCESS_BYTES;
            estimate.basis = estimate.basis.max(llm.basis);
        }
        // Without a measurement: SmolLM2's quickstart queries kept 119 of 215, Qwen's on pyfaq
        // 945 of 1,076.
        let share = input.speeds.kept(&self.kept_label()).unwrap_or(0.6);
        estimate.sizes.queries = Some((queries as f64 * share).round() as u64);
        Ok(estimate)
    }

    fn externals(&self, env: &StageEnv) -> Result<Vec<External>, StageError> {
        let mut externals = Vec::new();
        if self.dense() {
            externals.push(External::base_model(env, &self.base_model)?);
            externals.extend(External::encode_precision(env));
        }
        if let Some(judge) = &self.params.llm_judge {
            externals.push(llm_calls::external(&judge.llm, env)?);
        }
        Ok(externals)
    }

    fn run(&self, ctx: &StageContext) -> Result<StageOutcome, StageError> {
        let chunks: Vec<Chunk> = io::read_jsonl(&ctx.input(Artifact::Chunks)?.join(CHUNKS_FILE))?;
        let queries: Vec<QueryRecord> =
            io::read_jsonl(&ctx.input(Artifact::Queries)?.join(QUERIES_FILE))?;
        let mut verdicts = Verdicts::new(queries.len());
        if let Some(dedupe) = &self.params.dedupe {
            dedupe_queries(&queries, dedupe.threshold, &mut verdicts);
        }
        if let Some(round_trip) = &self.params.round_trip {
            self.round_trip(ctx, &chunks, &queries, round_trip, &mut verdicts)?;
        }
        if let Some(too_easy) = &self.params.too_easy {
            too_easy_queries(ctx, &chunks, &queries, too_easy.margin, &mut verdicts)?;
        }
        ctx.check_cancelled()?;
        let mut llm_calls = None;
        if let Some(judge) = &self.params.llm_judge {
            llm_calls = Some(self.llm_judge(ctx, judge, &chunks, &queries, &mut verdicts)?);
        }

        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        let mut summary = JudgeSummary {
            queries: queries.len(),
            ..JudgeSummary::default()
        };
        for (query, verdict) in queries.iter().zip(&verdicts.0) {
            match verdict {
                None => kept.push(query.clone()),
                Some((filter, why)) => {
                    let entry = summary.dropped.entry(filter.clone()).or_default();
                    entry.count += 1;
                    if entry.examples.len() < EXAMPLES_PER_FILTER {
                        entry.examples.push(Example {
                            query: query.query.clone(),
                            why: why.clone(),
                        });
                    }
                    dropped.push(DroppedQuery {
                        filter: filter.clone(),
                        why: why.clone(),
                        query: query.clone(),
                    });
                }
            }
        }
        summary.kept = kept.len();
        summary.llm = llm_calls;
        if queries.len() >= KEPT_MIN_INPUTS {
            Speeds::open(&ctx.env.hub.cache_dir)
                .record_kept(&self.kept_label(), kept.len() as f64 / queries.len() as f64);
        }
        io::write_jsonl(&ctx.out_dir.join(QUERIES_FILE), &kept)?;
        io::write_jsonl(&ctx.out_dir.join("dropped.jsonl"), &dropped)?;
        let mut provenance =
            io::Provenance::read(ctx.input(Artifact::Queries)?).unwrap_or_default();
        provenance
            .filters
            .extend(summary.dropped.iter().map(|(filter, d)| io::FilterDrop {
                stage: Self::KIND.to_owned(),
                filter: filter.clone(),
                dropped: d.count,
                of: summary.queries,
            }));
        provenance.write(&ctx.out_dir)?;
        io::write_json(&ctx.out_dir.join("summary.json"), &summary)?;
        ctx.table(&summary.table());
        if kept.is_empty() {
            return Err(StageError::Failed(
                "the judge dropped every query; see the table above (loosen `judge` or check query-gen)".to_owned(),
            ));
        }
        Ok(StageOutcome {
            summary: serde_json::to_value(&summary)?,
        })
    }
}

impl Judge {
    /// What the share of queries kept depends on, besides the queries: which filters run.
    fn kept_label(&self) -> String {
        let filters = [
            self.params.dedupe.is_some().then_some("dedupe"),
            self.params.round_trip.is_some().then_some("round-trip"),
            self.params.too_easy.is_some().then_some("too-easy"),
            self.params.llm_judge.is_some().then_some("llm"),
        ];
        let filters: Vec<&str> = filters.into_iter().flatten().collect();
        format!("judge {}", filters.join("+"))
    }

    /// Whether the round trip retrieves with the base model (and so needs it).
    fn dense(&self) -> bool {
        self.params
            .round_trip
            .as_ref()
            .is_some_and(|r| r.method != RoundTripMethod::Bm25)
    }

    /// Asks the LLM whether each still-kept query's chunk answers it.
    fn llm_judge(
        &self,
        ctx: &StageContext,
        judge: &LlmJudge,
        chunks: &[Chunk],
        queries: &[QueryRecord],
        verdicts: &mut Verdicts,
    ) -> Result<llm::CallStats, StageError> {
        let pending: Vec<usize> = verdicts.pending().collect();
        let passages: HashMap<&str, String> = chunks
            .iter()
            .map(|c| (c.id.as_str(), io::passage(c)))
            .collect();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "answerable": {"type": "boolean"},
                "reason": {"type": "string", "maxLength": 200},
            },
            "required": ["answerable", "reason"],
            "additionalProperties": false,
        });
        let requests: Vec<llm::Request> = pending
            .iter()
            .map(|&i| {
                let query = &queries[i];
                // The query's own positive when its chunk is not in the corpus input.
                let passage = passages
                    .get(query.chunk_id.as_str())
                    .map_or(query.positive.as_str(), String::as_str);
                let prompt = judge
                    .prompt
                    .replace("{passage}", passage)
                    .replace("{query}", &query.query);
                judge.llm.request(
                    Some(judge.system.clone()),
                    prompt,
                    Some(schema.clone()),
                    self.seed,
                )
            })
            .collect();
        if requests.is_empty() {
            return Ok(llm::CallStats::default());
        }
        let backend = llm_calls::connect(&judge.llm, &ctx.env, &ctx.cancel)?;
        let (answers, calls) = llm_calls::complete_with_progress(
            ctx,
            "judging queries (llm)",
            backend.as_ref(),
            &requests,
        )?;
        for (&i, answer) in pending.iter().zip(&answers) {
            match parse_verdict(answer) {
                Some(verdict) if verdict.answerable => {}
                Some(verdict) => verdicts.drop(i, "llm_judge", verdict.reason),
                None => verdicts.drop(
                    i,
                    "llm_judge (unparseable)",
                    format!("answer: {}", answer.chars().take(120).collect::<String>()),
                ),
            }
        }
        Ok(calls)
    }

    fn round_trip(
        &self,
        ctx: &StageContext,
        chunks: &[Chunk],
        queries: &[QueryRecord],
        settings: &RoundTrip,
        verdicts: &mut Verdicts,
    ) -> Result<(), StageError> {
        let pending: Vec<usize> = verdicts.pending().collect();
        if pending.is_empty() {
            return Ok(());
        }
        let position: HashMap<&str, usize> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| (c.id.as_str(), i))
            .collect();
        let passages: Vec<String> = chunks.iter().map(io::passage).collect();
        let texts: Vec<&str> = pending.iter().map(|&i| queries[i].query.as_str()).collect();
        let k = settings.top_k;
        // Rank (1-based) of each pending query's chunk under each method, None beyond top_k.
        let mut bm25_rank = None;
        let mut dense_rank = None;
        let rank_of = |hits: &[crate::index::Hit], query: &QueryRecord| {
            let own = position.get(query.chunk_id.as_str()).copied();
            hits.iter().position(|h| Some(h.doc) == own).map(|r| r + 1)
        };
        if settings.method != RoundTripMethod::Dense {
            let hits = bm25_search(ctx, chunks, &passages, &texts, k, "round trip (BM25)")?;
            bm25_rank = Some(
                hits.iter()
                    .zip(&pending)
                    .map(|(h, &i)| rank_of(h, &queries[i]))
                    .collect::<Vec<_>>(),
            );
        }
        if settings.method != RoundTripMethod::Bm25 {
            let corpus: Vec<&str> = passages.iter().map(String::as_str).collect();
            let (encoder, docs) =
                io::encode_corpus(ctx, &self.base_model, &corpus, self.params.batch_size)?;
            ctx.check_cancelled()?;
            let bar = ctx.progress("encoding queries", Some(texts.len() as u64));
            let embedded = encoder
                .encode_as(&texts, TextRole::Query, self.params.batch_size, &mut |n| {
                    bar.set(n as u64);
                })
                .map_err(io::model_error)?;
            drop(bar);
            let index = DenseIndex::new(encoder.dim(), docs.into_vec()).map_err(io::index_error)?;
            let hits = index
                .search_batch(embedded.as_slice(), k, &|_| {})
                .map_err(io::index_error)?;
            dense_rank = Some(
                hits.iter()
                    .zip(&pending)
                    .map(|(h, &i)| rank_of(h, &queries[i]))
                    .collect::<Vec<_>>(),
            );
        }
        for (n, &i) in pending.iter().enumerate() {
            let bm25 = bm25_rank.as_ref().map(|r| r[n]);
            let dense = dense_rank.as_ref().map(|r| r[n]);
            let found = |r: Option<Option<usize>>| r.is_some_and(|r| r.is_some());
            let keep = match settings.method {
                RoundTripMethod::Bm25 => found(bm25),
                RoundTripMethod::Dense => found(dense),
                RoundTripMethod::Either => found(bm25) || found(dense),
                RoundTripMethod::Both => found(bm25) && found(dense),
            };
            if !keep {
                verdicts.drop(i, "round_trip", format!("its chunk is not in the top {k}"));
            }
        }
        Ok(())
    }
}

/// The BM25 top `k` over the chunks' passages for each of `texts`, with a progress bar.
fn bm25_search(
    ctx: &StageContext,
    chunks: &[Chunk],
    passages: &[String],
    texts: &[&str],
    k: usize,
    label: &str,
) -> Result<Vec<Vec<crate::index::Hit>>, StageError> {
    let docs: Vec<(&str, &str)> = chunks
        .iter()
        .zip(passages)
        .map(|(c, p)| (c.id.as_str(), p.as_str()))
        .collect();
    let index = Bm25Index::build(&docs, None).map_err(io::index_error)?;
    let bar = ctx.progress(label, Some(texts.len() as u64));
    index
        .search_batch(texts, k, &|n| bar.inc(n as u64))
        .map_err(io::index_error)
}

/// Drops the queries still kept whose own chunk BM25 ranks first at `margin` times the
/// runner-up's score or more.
fn too_easy_queries(
    ctx: &StageContext,
    chunks: &[Chunk],
    queries: &[QueryRecord],
    margin: f64,
    verdicts: &mut Verdicts,
) -> Result<(), StageError> {
    let pending: Vec<usize> = verdicts.pending().collect();
    if pending.is_empty() {
        return Ok(());
    }
    let passages: Vec<String> = chunks.iter().map(io::passage).collect();
    let texts: Vec<&str> = pending.iter().map(|&i| queries[i].query.as_str()).collect();
    let hits = bm25_search(ctx, chunks, &passages, &texts, 2, "too easy (BM25)")?;
    for (top, &i) in hits.iter().zip(&pending) {
        if is_too_easy(top, chunks, &queries[i].chunk_id, margin) {
            verdicts.drop(
                i,
                "too_easy",
                format!("BM25 ranks its chunk first by {margin}x the runner-up or more"),
            );
        }
    }
    Ok(())
}

/// Whether `top` (the best two hits) has the chunk `own` first at `margin` times the second.
fn is_too_easy(top: &[crate::index::Hit], chunks: &[Chunk], own: &str, margin: f64) -> bool {
    match top {
        [first, rest @ ..] if chunks[first.doc].id == own => rest
            .first()
            .is_none_or(|second| f64::from(first.score) >= margin * f64::from(second.score)),
        _ => false,
    }
}

/// Per query: `None` while kept, else the filter that dropped it and why.
struct Verdicts(Vec<Option<(String, String)>>);

impl Verdicts {
    fn new(n: usize) -> Self {
        Self(vec![None; n])
    }

    fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_none())
            .map(|(i, _)| i)
    }

    fn drop(&mut self, i: usize, filter: &str, why: String) {
        if self.0[i].is_none() {
            self.0[i] = Some((filter.to_owned(), why));
        }
    }
}

/// An LLM judge's answer.
#[derive(Debug, Deserialize)]
struct Verdict {
    answerable: bool,
    #[serde(default)]
    reason: String,
}

/// The verdict in an answer; None when it is not `{"answerable": bool, ...}` JSON.
fn parse_verdict(answer: &str) -> Option<Verdict> {
    serde_json::from_str(answer.trim()).ok()
}

/// Lowercased words of letters and digits: "How do I…?" and "how do i" are the same query.
fn words(query: &str) -> Vec<String> {
    query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn dedupe_queries(queries: &[QueryRecord], threshold: f64, verdicts: &mut Verdicts) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_chunk: HashMap<&str, Vec<(usize, HashSet<String>)>> = HashMap::new();
    for (i, query) in queries.iter().enumerate() {
        let words = words(&query.query);
        let normalized = words.join(" ");
        if let Some(&first) = seen.get(&normalized) {
            verdicts.drop(i, "dedupe", format!("same as `{}`", queries[first].query));
            continue;
        }
        seen.insert(normalized, i);
        let set: HashSet<String> = words.into_iter().collect();
        let siblings = per_chunk.entry(query.chunk_id.as_str()).or_default();
        if let Some((j, overlap)) = siblings
            .iter()
            .map(|(j, other)| (*j, jaccard(&set, other)))
            .find(|(_, overlap)| *overlap >= threshold)
        {
            verdicts.drop(
                i,
                "dedupe",
                format!("near-copy ({overlap:.2}) of `{}`", queries[j].query),
            );
            continue;
        }
        siblings.push((i, set));
    }
}

fn jaccard(a: &HashSet<String>, b: &HashSet<String>) -> f64 {
    let union = a.union(b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(b).count() as f64 / union as f64
}

#[derive(Debug, Serialize)]
struct DroppedQuery {
    filter: String,
    why: String,
    #[serde(flatten)]
    query: QueryRecord,
}

#[derive(Debug, Default, Serialize)]
struct Example {
    query: String,
    why: String,
}

#[derive(Debug, Default, Serialize)]
struct Dropped {
    count: usize,
    examples: Vec<Example>,
}

/// `summary.json`: kept, and dropped per filter with examples.
#[derive(Debug, Default, Serialize)]
struct JudgeSummary {
    queries: usize,
    kept: usize,
    dropped: BTreeMap<String, Dropped>,
    /// What the LLM judge cost, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    llm: Option<llm::CallStats>,
}

impl JudgeSummary {
    fn table(&self) -> Table {
        let mut rows = vec![vec![
            "queries in".to_owned(),
            self.queries.to_string(),
            String::new(),
        ]];
        for (filter, dropped) in &self.dropped {
            let example = dropped
                .examples
                .first()
                .map(|e| {
                    let q: String = e.query.chars().take(50).collect();
                    format!("e.g. \"{q}\": {}", e.why)
                })
                .unwrap_or_default();
            rows.push(vec![
                format!("dropped: {filter}"),
                dropped.count.to_string(),
                example,
            ]);
        }
        if let Some(llm) = &self.llm {
            rows.push(vec![
                "llm judge calls (cached)".to_owned(),
                format!("{} ({})", llm.calls, llm.cached),
                format!("{:.2} calls/s", llm.calls_per_second()),
            ]);
        }
        rows.push(vec![
            "kept".to_owned(),
            self.kept.to_string(),
            String::new(),
        ]);
        Table {
            title: "judge".to_owned(),
            columns: vec!["what".to_owned(), "count".to_owned(), "example".to_owned()],
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(chunk: &str, text: &str) -> QueryRecord {
        QueryRecord {
            id: QueryRecord::id_for(chunk, "llm", text),
            query: text.to_owned(),
            chunk_id: chunk.to_owned(),
            doc_id: "d".to_owned(),
            source: "d.md".to_owned(),
            positive: "p".to_owned(),
            strategy: "llm".to_owned(),
        }
    }

    #[test]
    fn a_verdict_that_does_not_parse_is_none() {
        assert!(
            parse_verdict(r#"{"answerable": true, "reason": "it says so"}"#)
                .is_some_and(|v| v.answerable)
        );
        assert!(parse_verdict(r#" {"answerable": false} "#).is_some_and(|v| !v.answerable));
        for bad in [
            "yes",
            r#"{"answerable": "yes"}"#,
            r#"{"answerable": true"#,
            "",
        ] {
            assert!(parse_verdict(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn dedupe_drops_repeats_anywhere_and_near_copies_within_a_chunk() {
        let queries = vec![
            query("a", "How do I restore a snapshot?"),
            query("b", "how do I restore a snapshot"), // same words, other chunk
            query("a", "How do I restore a snapshot quickly?"), // near-copy in chunk a
            query("b", "How do I restore a snapshot quickly?"), // same text as above: a repeat
            query("c", "What port does the daemon use?"),
        ];
        let mut verdicts = Verdicts::new(queries.len());
        dedupe_queries(&queries, 0.8, &mut verdicts);
        let dropped: Vec<bool> = verdicts.0.iter().map(Option::is_some).collect();
        assert_eq!(dropped, [false, true, true, true, false]);
    }

    #[test]
    fn too_easy_needs_the_own_chunk_first_by_the_margin() {
        use crate::index::Hit;
        let chunk = |id: &str| Chunk {
            id: id.into(),
            doc_id: "d".into(),
            source: "d.md".into(),
            title: String::new(),
            text: "t".into(),
            n_tokens: 1,
        };
        let chunks = [chunk("a"), chunk("b")];
        let hits = |a: f32, b: f32| vec![Hit { doc: 0, score: a }, Hit { doc: 1, score: b }];
        assert!(is_too_easy(&hits(9.0, 3.0), &chunks, "a", 3.0));
        assert!(!is_too_easy(&hits(8.9, 3.0), &chunks, "a", 3.0));
        // Another chunk first: not easy, whatever the scores.
        assert!(!is_too_easy(&hits(9.0, 1.0), &chunks, "b", 3.0));
        // Alone in the results: nothing competes.
        assert!(is_too_easy(
            &[Hit { doc: 0, score: 1.0 }],
            &chunks,
            "a",
            3.0
        ));
        assert!(!is_too_easy(&[], &chunks, "a", 3.0));
    }
}
