//! Lexical search: BM25 over the chunks with tantivy.
//!
//! Scores are tantivy's BM25 (k1 = 1.2, b = 0.75, idf = ln(1 + (N − n + 0.5) / (n + 0.5)), the
//! document length quantised to one byte above 40 tokens), summed over the query's distinct terms
//! and multiplied by how often each term occurs in the query (Okapi's query-term weight with
//! k3 → ∞, as Lucene gets by repeating a clause).
//!
//! Text analysis mirrors Lucene's `EnglishAnalyzer`, the usual BM25 baseline in BEIR: split on
//! anything that is not a letter or digit, drop tokens over 40 bytes, lowercase, fold accents to
//! ASCII, drop Lucene's 33 English stop words, and stem with the Snowball English (Porter2)
//! stemmer. Stop words go because BM25's idf barely weighs them yet every query that holds "the"
//! would walk nearly every posting list; a query made only of stop words finds nothing.
//!
//! Queries never go through tantivy's query parser: LLM-written questions are full of `?`, `:`,
//! quotes, parentheses and `AND`, which are syntax there. The query is the analysed tokens, so
//! any text is a valid query.
//!
//! Tantivy builds, stores and compresses the index, and its [`Bm25Weight`] scores each posting;
//! the search loop is our own: term at a time into a dense score array, then a linear-time
//! selection of the best `k`. Tantivy's own path (a `BooleanQuery` of SHOULD `TermQuery`s,
//! which the tests hold this one to) walks all terms' postings in step with block-max WAND
//! pruning, built to skip most of a large index; on chunk corpora, where common terms cover much
//! of the corpus, its bookkeeping costs more than it saves. The 167 pyfaq questions repeated to
//! 10,000 queries over its 4,201 sections, top 100, on the shared 2-core box: 4.4 s with
//! tantivy's path, 1.2 s with this one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use fs_err as fs;
use rayon::prelude::*;
use tantivy::columnar::ColumnValues;
use tantivy::fieldnorm::FieldNormReader;
use tantivy::index::{InvertedIndexReader, SegmentId};
use tantivy::indexer::NoMergePolicy;
use tantivy::query::Bm25Weight;
use tantivy::schema::{FAST, Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions};
use tantivy::tokenizer::{
    AsciiFoldingFilter, Language, LowerCaser, RemoveLongFilter, SimpleTokenizer, Stemmer,
    StopWordFilter, TextAnalyzer, TokenStream,
};
use tantivy::{
    Index, IndexWriter, ReloadPolicy, Score, Searcher, SegmentReader, TantivyDocument, Term, doc,
};

use super::top_k::select_best;
use super::{Hit, IndexError, OnProgress};

/// The name the analyser is registered under in the index.
const ANALYZER_NAME: &str = "ragd_english";

/// The fast field that maps a tantivy document back to its position in the caller's list.
const POSITION_FIELD: &str = "position";

/// Tokens longer than this many bytes are dropped (base64 blobs, minified code); tantivy's own
/// `en_stem` analyser uses the same limit.
const MAX_TOKEN_BYTES: usize = 40;

/// Lucene's English stop words (`EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`,
/// <https://github.com/apache/lucene/blob/d5d6dc079395c47cd6d12dcce3bcfdd2c7d9dc63/lucene/analysis/common/src/java/org/apache/lucene/analysis/en/EnglishAnalyzer.java#L46>).
/// Spelled out rather than taken from `StopWordFilter::new(Language::English)` so the choice is
/// visible here and does not hinge on a tantivy feature flag.
const ENGLISH_STOP_WORDS: [&str; 33] = [
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
];

/// Memory the indexing thread may fill before it writes a segment: enough for a corpus of tens
/// of thousands of chunks to fit one segment, so no merge is needed.
const WRITER_MEMORY: usize = 128 * 1024 * 1024;

/// Queries a batch worker runs between progress reports: small enough for a smooth bar, large
/// enough that reporting costs nothing next to the searches.
const QUERIES_PER_PROGRESS: usize = 32;

/// A BM25 index over a list of `(id, text)` documents.
pub struct Bm25Index {
    text_field: Field,
    analyzer: TextAnalyzer,
    ids: Vec<String>,
    /// The index's one segment; `None` for an empty corpus.
    segment: Option<SegmentTerms>,
}

/// What scoring reads from the index's single segment.
struct SegmentTerms {
    postings: Arc<InvertedIndexReader>,
    fieldnorms: FieldNormReader,
    /// Position in the caller's list of each tantivy document, ascending.
    positions: Vec<usize>,
    num_docs: u64,
    /// Mean analysed length of a document, BM25's avgdl.
    average_length: Score,
}

/// A batch worker's reusable buffers: the analyser, the score of every document (zero except
/// during a query), and the documents a query touched. Reusing them matters: a fresh list of
/// thousands of candidates per query went to the kernel for memory each time, which cost a third
/// of the search time in system calls.
struct Scratch {
    analyzer: TextAnalyzer,
    scores: Vec<Score>,
    touched: Vec<u32>,
    candidates: Vec<Hit>,
}

impl Bm25Index {
    /// Indexes `docs` in RAM, or in `dir` (created if missing, and it must be empty) when the
    /// corpus is too big to keep in memory; tantivy then memory-maps its files.
    pub fn build(docs: &[(&str, &str)], dir: Option<&Path>) -> Result<Self, IndexError> {
        Self::build_in_segments(docs, dir, usize::MAX)
    }

    /// [`build`](Self::build), committing a segment every `docs_per_segment` documents; tests
    /// use it to reach the merge that big corpora reach by filling the writer's memory.
    fn build_in_segments(
        docs: &[(&str, &str)],
        dir: Option<&Path>,
        docs_per_segment: usize,
    ) -> Result<Self, IndexError> {
        let ids = unique_ids(docs)?;
        let (index, text_field, position_field) = create_index(dir)?;
        let searcher = write_in_order(&index, docs, text_field, position_field, docs_per_segment)?;
        let segment = read_segment(&searcher, text_field)?;
        Ok(Self {
            text_field,
            analyzer: english_analyzer(),
            ids,
            segment,
        })
    }

    /// Number of indexed documents.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The id of the document at `position` in the list the index was built from.
    pub fn id(&self, position: usize) -> Option<&str> {
        self.ids.get(position).map(String::as_str)
    }

    /// The `k` best documents for `query`, best first; equal scores rank by position. Text that
    /// analyses to no terms (empty, only stop words or punctuation) finds nothing.
    pub fn search(&self, query: &str, k: usize) -> Result<Vec<Hit>, IndexError> {
        self.search_with(&mut self.scratch(), query, k)
    }

    /// [`search`](Self::search) for each query, in parallel over queries on the rayon pool;
    /// `on_progress` hears how many queries finished.
    pub fn search_batch(
        &self,
        queries: &[&str],
        k: usize,
        on_progress: OnProgress<'_>,
    ) -> Result<Vec<Vec<Hit>>, IndexError> {
        let chunks = queries
            .par_chunks(QUERIES_PER_PROGRESS)
            .map_init(
                || self.scratch(),
                |scratch, chunk| {
                    let hits = chunk
                        .iter()
                        .map(|query| self.search_with(scratch, query, k))
                        .collect::<Result<Vec<_>, _>>()?;
                    on_progress(chunk.len());
                    Ok(hits)
                },
            )
            .collect::<Result<Vec<_>, IndexError>>()?;
        Ok(chunks.into_iter().flatten().collect())
    }

    fn scratch(&self) -> Scratch {
        Scratch {
            analyzer: self.analyzer.clone(),
            scores: vec![0.0; self.segment.as_ref().map_or(0, |s| s.positions.len())],
            touched: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// Scores term at a time into `scratch.scores`, then keeps the best `k`. A matching
    /// document's score is positive (idf > 0, tf ≥ 1), so zero marks one not yet touched.
    fn search_with(
        &self,
        scratch: &mut Scratch,
        query: &str,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let Some(segment) = &self.segment else {
            return Ok(Vec::new());
        };
        if k == 0 {
            return Ok(Vec::new());
        }
        for (term, count) in query_terms(&mut scratch.analyzer, query) {
            let term = Term::from_field_text(self.text_field, &term);
            let read_error = |source| IndexError::Read { source };
            let Some(info) = segment.postings.get_term_info(&term).map_err(read_error)? else {
                continue;
            };
            let weight = Bm25Weight::for_one_term(
                u64::from(info.doc_freq),
                segment.num_docs,
                segment.average_length,
            )
            .boost_by(count as Score);
            let mut block = segment
                .postings
                .read_block_postings_from_terminfo(&info, IndexRecordOption::WithFreqs)
                .map_err(read_error)?;
            while !block.docs().is_empty() {
                for (&doc, &term_freq) in block.docs().iter().zip(block.freqs()) {
                    let score = &mut scratch.scores[doc as usize];
                    if *score == 0.0 {
                        scratch.touched.push(doc);
                    }
                    *score += weight.score(segment.fieldnorms.fieldnorm_id(doc), term_freq);
                }
                block.advance();
            }
        }
        let candidates = &mut scratch.candidates;
        candidates.extend(scratch.touched.drain(..).map(|doc| Hit {
            doc: segment.positions[doc as usize],
            score: std::mem::take(&mut scratch.scores[doc as usize]),
        }));
        select_best(candidates, k);
        // A right-sized copy of the k kept; the buffer keeps its capacity for the next query.
        let hits = candidates.to_vec();
        candidates.clear();
        Ok(hits)
    }
}

impl std::fmt::Debug for Bm25Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bm25Index")
            .field("documents", &self.ids.len())
            .finish_non_exhaustive()
    }
}

/// The analyser documents and queries both go through (see the module doc).
fn english_analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .filter(StopWordFilter::remove(
            ENGLISH_STOP_WORDS.iter().map(|word| (*word).to_owned()),
        ))
        .filter(Stemmer::new(Language::English))
        .build()
}

/// The distinct analysed terms of `text` with their counts, in term order so scores are summed
/// in the same order, to the last bit, on every run.
fn query_terms(analyzer: &mut TextAnalyzer, text: &str) -> BTreeMap<String, u32> {
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    analyzer.token_stream(text).process(&mut |token| {
        *counts.entry(token.text.clone()).or_default() += 1;
    });
    counts
}

/// An empty index with the text field (frequencies and lengths, no positions: no phrase queries
/// are run) and the position fast field, in RAM or in `dir`.
fn create_index(dir: Option<&Path>) -> Result<(Index, Field, Field), IndexError> {
    let mut schema = Schema::builder();
    let text_indexing = TextFieldIndexing::default()
        .set_tokenizer(ANALYZER_NAME)
        .set_index_option(IndexRecordOption::WithFreqs)
        .set_fieldnorms(true);
    let text_field = schema.add_text_field(
        "text",
        TextOptions::default().set_indexing_options(text_indexing),
    );
    let position_field = schema.add_u64_field(POSITION_FIELD, FAST);
    let schema = schema.build();
    let index = match dir {
        None => Index::create_in_ram(schema),
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
            let mut entries = fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
            if entries.next().is_some() {
                return Err(IndexError::DirectoryNotEmpty {
                    path: dir.to_owned(),
                });
            }
            Index::create_in_dir(dir, schema).map_err(tantivy_error("creating the index"))?
        }
    };
    index
        .tokenizers()
        .register(ANALYZER_NAME, english_analyzer());
    Ok((index, text_field, position_field))
}

/// Adds the documents from one writer thread, so a segment holds them in input order, and
/// merges the segments (if the writer's memory or `docs_per_segment` made several) into one, in
/// input order. One segment keeps the search loop to one postings list per term, and input
/// order makes document order the tie-break order. Rejected: several writer threads, which deal
/// documents out to segments in no fixed order.
fn write_in_order(
    index: &Index,
    docs: &[(&str, &str)],
    text_field: Field,
    position_field: Field,
    docs_per_segment: usize,
) -> Result<Searcher, IndexError> {
    let mut writer: IndexWriter<TantivyDocument> = index
        .writer_with_num_threads(1, WRITER_MEMORY)
        .map_err(tantivy_error("opening the index writer"))?;
    // Background merges would join segments in whatever order they pick.
    writer.set_merge_policy(Box::new(NoMergePolicy));
    for (position, (_, text)) in docs.iter().enumerate() {
        writer
            .add_document(doc!(text_field => *text, position_field => position as u64))
            .map_err(tantivy_error("adding a document"))?;
        if (position + 1) % docs_per_segment == 0 {
            writer
                .commit()
                .map_err(tantivy_error("committing the index"))?;
        }
    }
    writer
        .commit()
        .map_err(tantivy_error("committing the index"))?;

    let reader = index
        .reader_builder()
        .reload_policy(ReloadPolicy::Manual)
        .try_into()
        .map_err(tantivy_error("opening the index reader"))?;
    let segments = reader.searcher().segment_readers().to_vec();
    if segments.len() > 1 {
        let mut by_first_position = segments
            .iter()
            .map(|segment| {
                let first = position_column(segment)?.get_val(0);
                Ok((first, segment.segment_id()))
            })
            .collect::<Result<Vec<_>, IndexError>>()?;
        by_first_position.sort_unstable();
        let ids: Vec<SegmentId> = by_first_position.into_iter().map(|(_, id)| id).collect();
        writer
            .merge(&ids)
            .wait()
            .map_err(tantivy_error("merging segments"))?;
        reader
            .reload()
            .map_err(tantivy_error("reloading the index reader"))?;
    }
    writer
        .wait_merging_threads()
        .map_err(tantivy_error("finishing segment merges"))?;
    Ok(reader.searcher())
}

/// The index's single segment, its positions checked to ascend; `None` when it is empty.
fn read_segment(
    searcher: &Searcher,
    text_field: Field,
) -> Result<Option<SegmentTerms>, IndexError> {
    let segments = searcher.segment_readers();
    let Some(segment) = segments.first() else {
        return Ok(None);
    };
    if segments.len() > 1 {
        return Err(IndexError::Layout {
            why: format!("{} segments after merging into one", segments.len()),
        });
    }
    let column = position_column(segment)?;
    let positions: Vec<usize> = (0..segment.max_doc())
        .map(|doc| column.get_val(doc) as usize)
        .collect();
    if let Some(pair) = positions.windows(2).find(|pair| pair[0] >= pair[1]) {
        return Err(IndexError::Layout {
            why: format!("position {} follows {}", pair[1], pair[0]),
        });
    }
    let postings = segment
        .inverted_index(text_field)
        .map_err(tantivy_error("opening the postings"))?;
    let fieldnorms = segment
        .get_fieldnorms_reader(text_field)
        .map_err(tantivy_error("opening the document lengths"))?;
    let num_docs = u64::from(segment.max_doc());
    // As tantivy's `Bm25Weight::for_terms` computes it for a query.
    let average_length = postings.total_num_tokens() as Score / num_docs as Score;
    Ok(Some(SegmentTerms {
        postings,
        fieldnorms,
        positions,
        num_docs,
        average_length,
    }))
}

fn position_column(
    segment: &SegmentReader,
) -> Result<std::sync::Arc<dyn ColumnValues<u64>>, IndexError> {
    Ok(segment
        .fast_fields()
        .u64(POSITION_FIELD)
        .map_err(tantivy_error("reading document positions"))?
        .first_or_default_col(u64::MAX))
}

fn unique_ids(docs: &[(&str, &str)]) -> Result<Vec<String>, IndexError> {
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(docs.len());
    for (position, (id, _)) in docs.iter().enumerate() {
        if let Some(first) = seen.insert(id, position) {
            return Err(IndexError::DuplicateId {
                id: (*id).to_owned(),
                first,
                second: position,
            });
        }
    }
    Ok(docs.iter().map(|(id, _)| (*id).to_owned()).collect())
}

fn io_error(path: &Path, source: std::io::Error) -> IndexError {
    IndexError::Io {
        path: path.to_owned(),
        source,
    }
}

fn tantivy_error(action: &'static str) -> impl Fn(tantivy::TantivyError) -> IndexError {
    move |source| IndexError::Tantivy { action, source }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Okapi BM25 with tantivy's constants, written out from the textbook formula.
    fn textbook_bm25(
        query_count: f64,
        doc_freq: f64,
        num_docs: f64,
        term_freq: f64,
        doc_len: f64,
        avg_doc_len: f64,
    ) -> f64 {
        let (k1, b) = (1.2, 0.75);
        let idf = (1.0 + (num_docs - doc_freq + 0.5) / (doc_freq + 0.5)).ln();
        query_count * idf * (k1 + 1.0) * term_freq
            / (term_freq + k1 * (1.0 - b + b * doc_len / avg_doc_len))
    }

    fn assert_close(got: f32, want: f64) {
        let tolerance = 1e-5 * want.abs().max(1.0);
        assert!(
            (f64::from(got) - want).abs() <= tolerance,
            "got {got}, want {want}"
        );
    }

    fn tiny_corpus() -> Vec<(&'static str, &'static str)> {
        vec![
            ("d0", "cat cat dog"),
            ("d1", "dog bird"),
            ("d2", "fish"),
            // "and" is a stop word and "cats"/"dogs" stem to "cat"/"dog": two tokens long.
            ("d3", "Cats and dogs!"),
        ]
    }

    #[test]
    fn scores_match_the_textbook_formula() {
        let index = Bm25Index::build(&tiny_corpus(), None).expect("the index builds");
        // After analysis: d0 = [cat, cat, dog], d1 = [dog, bird], d2 = [fish], d3 = [cat, dog].
        // N = 4, avgdl = 8 / 4 = 2, df(cat) = 2, df(dog) = 3. The query analyses to
        // [cat, dog, cat]: "AND" is a stop word and the punctuation is no syntax.
        let hits = index
            .search("Cat? dog: AND (cats)", 10)
            .expect("the search succeeds");
        let cat = |tf, dl| textbook_bm25(2.0, 2.0, 4.0, tf, dl, 2.0);
        let dog = |tf, dl| textbook_bm25(1.0, 3.0, 4.0, tf, dl, 2.0);
        let expected = [
            (0, cat(2.0, 3.0) + dog(1.0, 3.0)),
            (3, cat(1.0, 2.0) + dog(1.0, 2.0)),
            (1, dog(1.0, 2.0)),
        ];
        assert_eq!(hits.len(), expected.len(), "{hits:?}");
        for (hit, (doc, score)) in hits.iter().zip(expected) {
            assert_eq!(hit.doc, doc, "{hits:?}");
            assert_close(hit.score, score);
        }
        // Hand-computed: 2·ln2·2.2·2/(2 + 1.2·1.375) + ln(10/7)·2.2·1/(1 + 1.65).
        assert_close(hits[0].score, 1.967_257);
    }

    /// Tantivy's own BM25 search over the same index: a `BooleanQuery` of SHOULD term queries,
    /// each boosted by its count in the query, collected by `TopDocs`.
    fn tantivy_search(docs: &[(&str, &str)], queries: &[&str], k: usize) -> Vec<Vec<Hit>> {
        use tantivy::collector::TopDocs;
        use tantivy::query::{BooleanQuery, BoostQuery, Occur, Query, TermQuery};
        let (index, text_field, position_field) = create_index(None).expect("an index");
        let searcher =
            write_in_order(&index, docs, text_field, position_field, usize::MAX).expect("built");
        let mut analyzer = english_analyzer();
        queries
            .iter()
            .map(|query| {
                let clauses: Vec<(Occur, Box<dyn Query>)> = query_terms(&mut analyzer, query)
                    .into_iter()
                    .map(|(term, count)| {
                        let term = Term::from_field_text(text_field, &term);
                        let query = TermQuery::new(term, IndexRecordOption::WithFreqs);
                        let boosted: Box<dyn Query> =
                            Box::new(BoostQuery::new(Box::new(query), count as Score));
                        (Occur::Should, boosted)
                    })
                    .collect();
                searcher
                    .search(
                        &BooleanQuery::new(clauses),
                        &TopDocs::with_limit(k).order_by_score(),
                    )
                    .expect("tantivy searches")
                    .into_iter()
                    .map(|(score, address)| Hit {
                        doc: address.doc_id as usize,
                        score,
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn agrees_with_tantivys_boolean_query() {
        let texts: Vec<String> = (0..300)
            .map(|i| {
                (0..(5 + i % 23))
                    .map(|j| format!("w{}", (i * 7 + j * j) % 41))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let ids: Vec<String> = (0..texts.len()).map(|i| format!("d{i}")).collect();
        let docs: Vec<(&str, &str)> = ids
            .iter()
            .map(String::as_str)
            .zip(texts.iter().map(String::as_str))
            .collect();
        let queries = ["w1 w2 w3", "w5 w5 w40", "w0", "w7 w11 w13 w17 w19 w23 w29"];
        let index = Bm25Index::build(&docs, None).expect("the index builds");
        let ours = index
            .search_batch(&queries, 25, &|_| {})
            .expect("the batch search succeeds");
        let reference = tantivy_search(&docs, &queries, 25);
        for (ours, reference) in ours.iter().zip(&reference) {
            assert_eq!(ours.len(), reference.len());
            for (rank, (a, b)) in ours.iter().zip(reference).enumerate() {
                // Sums taken in another order may differ in the last bits, and may then swap
                // documents whose scores are that close.
                assert!(
                    (a.score - b.score).abs() <= 1e-5 * b.score,
                    "{a:?} vs {b:?}"
                );
                let separated = |hits: &[Hit]| {
                    [rank.checked_sub(1), Some(rank + 1)]
                        .into_iter()
                        .flatten()
                        .filter_map(|other| hits.get(other))
                        .all(|other| (other.score - b.score).abs() > 1e-5 * b.score)
                };
                if separated(reference) {
                    assert_eq!(a.doc, b.doc, "rank {rank}: {ours:?} vs {reference:?}");
                }
            }
        }
    }

    #[test]
    fn ties_rank_by_position_and_k_cuts_the_list() {
        let docs = [
            ("a", "salmon river"),
            ("b", "trout lake"),
            ("c", "salmon river"),
            ("d", "salmon river"),
        ];
        let index = Bm25Index::build(&docs, None).expect("the index builds");
        let hits = index.search("salmon", 2).expect("the search succeeds");
        assert_eq!(hits.iter().map(|hit| hit.doc).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(hits[0].score, hits[1].score);
        let all = index.search("salmon", 10).expect("the search succeeds");
        assert_eq!(all.iter().map(|hit| hit.doc).collect::<Vec<_>>(), [0, 2, 3]);
    }

    #[test]
    fn segments_merge_back_into_input_order() {
        let texts: Vec<String> = (0..40)
            .map(|i| format!("salmon {} trout{}", "river ".repeat(i % 3), i % 4))
            .collect();
        let ids: Vec<String> = (0..texts.len()).map(|i| format!("d{i}")).collect();
        let docs: Vec<(&str, &str)> = ids
            .iter()
            .map(String::as_str)
            .zip(texts.iter().map(String::as_str))
            .collect();
        let whole = Bm25Index::build(&docs, None).expect("the index builds");
        let pieced = Bm25Index::build_in_segments(&docs, None, 7).expect("the index builds");
        let positions = pieced
            .segment
            .as_ref()
            .map(|segment| segment.positions.clone());
        assert_eq!(positions, Some((0..texts.len()).collect::<Vec<_>>()));
        for query in ["salmon", "river trout2", "trout1 salmon river"] {
            let hits = pieced.search(query, 12).expect("the search succeeds");
            assert_eq!(hits, whole.search(query, 12).expect("the search succeeds"));
            for pair in hits.windows(2) {
                assert!(
                    pair[0].score > pair[1].score
                        || (pair[0].score == pair[1].score && pair[0].doc < pair[1].doc),
                    "{hits:?}"
                );
            }
        }
    }

    #[test]
    fn any_text_is_a_valid_query() {
        let index = Bm25Index::build(&tiny_corpus(), None).expect("the index builds");
        for query in [
            "\"unbalanced quote",
            "AND OR NOT",
            "((dog",
            "text:dog",
            "dog^2 cat~1 fi*",
            "-dog +cat",
            "[1 TO 5] {x}",
            "\\",
            "",
            "   ",
        ] {
            index.search(query, 5).expect("the search succeeds");
        }
        assert_eq!(
            index
                .search("text:dog", 5)
                .expect("the search succeeds")
                .len(),
            3
        );
        // Only stop words and punctuation: nothing to search for.
        assert!(
            index
                .search("to be, or not to be?", 5)
                .expect("the search succeeds")
                .is_empty()
        );
        assert!(
            index
                .search("dog", 0)
                .expect("the search succeeds")
                .is_empty()
        );
    }

    #[test]
    fn folds_accents_and_stems() {
        let docs = [("x", "Un café à Paris"), ("y", "the runner was running")];
        let index = Bm25Index::build(&docs, None).expect("the index builds");
        assert_eq!(
            index.search("CAFE", 5).expect("the search succeeds")[0].doc,
            0
        );
        assert_eq!(
            index.search("runs", 5).expect("the search succeeds")[0].doc,
            1
        );
    }

    #[test]
    fn batch_matches_single_searches_and_reports_progress() {
        let docs: Vec<(String, String)> = (0..200)
            .map(|i| {
                (
                    format!("doc{i}"),
                    format!("word{} word{} common{}", i % 17, i % 5, i % 3),
                )
            })
            .collect();
        let docs: Vec<(&str, &str)> = docs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let index = Bm25Index::build(&docs, None).expect("the index builds");
        let queries: Vec<String> = (0..100)
            .map(|i| format!("word{} common{}", i % 7, i % 4))
            .collect();
        let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
        let finished = AtomicUsize::new(0);
        let batch = index
            .search_batch(&queries, 10, &|n| {
                finished.fetch_add(n, Ordering::Relaxed);
            })
            .expect("the batch search succeeds");
        assert_eq!(finished.into_inner(), queries.len());
        for (query, hits) in queries.iter().zip(&batch) {
            assert_eq!(&index.search(query, 10).expect("the search succeeds"), hits);
        }
    }

    #[test]
    fn builds_in_a_directory_that_must_be_empty() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("bm25");
        let index = Bm25Index::build(&tiny_corpus(), Some(&path)).expect("the index builds");
        assert_eq!(
            index.search("fish", 3).expect("the search succeeds")[0].doc,
            2
        );
        assert_eq!(index.id(2), Some("d2"));
        let error = Bm25Index::build(&tiny_corpus(), Some(&path)).expect_err("the build fails");
        assert!(
            matches!(error, IndexError::DirectoryNotEmpty { .. }),
            "{error}"
        );
    }

    #[test]
    fn rejects_duplicate_ids_and_handles_an_empty_corpus() {
        let error = Bm25Index::build(&[("a", "x"), ("b", "y"), ("a", "z")], None)
            .expect_err("the build fails");
        assert_eq!(
            error.to_string(),
            "document id `a` appears twice, at positions 0 and 2"
        );
        let empty = Bm25Index::build(&[], None).expect("the index builds");
        assert!(empty.is_empty());
        assert!(
            empty
                .search("anything", 5)
                .expect("the search succeeds")
                .is_empty()
        );
    }

    /// A corpus with English-like statistics: words drawn from a Zipf distribution over a
    /// 30,000-word vocabulary, chunks of 150–250 words, queries of 6–12 words taken from a chunk.
    fn zipf_corpus(num_docs: usize, num_queries: usize) -> (Vec<String>, Vec<String>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let vocabulary = 30_000;
        let cumulative: Vec<f64> = (1..=vocabulary)
            .scan(0.0, |total, rank| {
                *total += 1.0 / f64::from(rank);
                Some(*total)
            })
            .collect();
        let total = cumulative[cumulative.len() - 1];
        let word = |rng: &mut rand_chacha::ChaCha8Rng| {
            let u = rng.random_range(0.0..total);
            format!("w{}", cumulative.partition_point(|&c| c < u))
        };
        let docs: Vec<String> = (0..num_docs)
            .map(|_| {
                let len = rng.random_range(150..250);
                (0..len)
                    .map(|_| word(&mut rng))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let queries = (0..num_queries)
            .map(|i| {
                let words: Vec<&str> = docs[i % num_docs].split(' ').collect();
                let len = rng.random_range(6..12);
                (0..len)
                    .map(|_| words[rng.random_range(0..words.len())])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        (docs, queries)
    }

    /// `cargo test --release --lib index::bm25::tests::build_and_search_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::print_stderr)]
    fn build_and_search_speed() {
        let (docs, queries) = zipf_corpus(10_000, 10_000);
        let ids: Vec<String> = (0..docs.len()).map(|i| format!("c{i}")).collect();
        let docs: Vec<(&str, &str)> = ids
            .iter()
            .map(String::as_str)
            .zip(docs.iter().map(String::as_str))
            .collect();
        let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
        let started = std::time::Instant::now();
        let index = Bm25Index::build(&docs, None).expect("the index builds");
        let built = started.elapsed();
        let started = std::time::Instant::now();
        let hits = index
            .search_batch(&queries, 100, &|_| {})
            .expect("the batch search succeeds");
        let searched = started.elapsed();
        let found = queries
            .iter()
            .enumerate()
            .filter(|(i, _)| hits[*i].iter().any(|hit| hit.doc == i % docs.len()))
            .count();
        eprintln!(
            "bm25: build {built:?}, {} queries top-100 {searched:?} on {} threads; {found} find their chunk",
            queries.len(),
            rayon::current_num_threads()
        );
    }
}
