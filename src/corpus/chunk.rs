//! Cutting documents into chunks by the base model's tokens, along their structure.
//!
//! Each section (the text under one heading) is encoded once, without special tokens; every cut
//! is then made at a token index and mapped back to the text through the tokens' byte offsets.
//! A chunk's `n_tokens` is therefore the number of tokens the model sees for that text, not a sum
//! over pieces that a tokenizer with merges across whitespace (byte-level BPE) would miscount. The
//! alternative, encoding each candidate chunk again, tokenizes every text twice or more.
//!
//! Rules, in order:
//! 1. A heading starts a new chunk; the chunk's `title` is the heading path ("Guide > Install").
//! 2. Whole paragraphs are packed into a chunk while it stays within `max_tokens`.
//! 3. A paragraph longer than `max_tokens` is split on its own: each piece ends at the last
//!    sentence boundary that fits, or, inside a sentence longer than `max_tokens`, at the last
//!    word start that fits (a hard cut only when one word is longer than half the budget). The
//!    next piece starts `overlap` tokens before the previous one ended, so no sentence that
//!    straddles a cut is lost to both pieces.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::document::{Block, Document};
use super::error::CorpusError;
use super::reporter::{CorpusReporter, Phase};
use super::sentence::sentence_ends;
use super::skip::{Skip, SkipReason};
use super::source::Corpus;

/// How big chunks are, in tokens of the base model (special tokens not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkOptions {
    pub max_tokens: usize,
    /// Tokens repeated between consecutive pieces of one split paragraph.
    pub overlap: usize,
}

impl ChunkOptions {
    fn validate(self) -> Result<Self, CorpusError> {
        if self.max_tokens == 0 || self.overlap >= self.max_tokens {
            return Err(CorpusError::BadOptions {
                max_tokens: self.max_tokens,
                overlap: self.overlap,
            });
        }
        Ok(self)
    }
}

/// One chunk: a line of `chunks.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The first 16 hex digits of blake3 over the document id, title, text and the occurrence of
    /// that title and text in the document: it changes only when the chunk itself does, so editing
    /// one file leaves every other file's chunk ids (and whatever is cached under them) alone.
    pub id: String,
    pub doc_id: String,
    pub source: String,
    /// The heading path, or the document's title outside any heading.
    pub title: String,
    /// Paragraphs separated by a blank line, whitespace inside them collapsed.
    pub text: String,
    pub n_tokens: usize,
}

/// Counts for the chunk stage's summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkStats {
    /// Files (or JSONL records) considered.
    pub documents_seen: usize,
    /// Documents that produced at least one chunk.
    pub documents_chunked: usize,
    pub skipped: BTreeMap<SkipReason, usize>,
    /// The first few locations per reason.
    pub skipped_examples: BTreeMap<SkipReason, Vec<String>>,
    /// Files read with a few invalid UTF-8 sequences replaced by U+FFFD.
    pub lossy_utf8: usize,
    pub chunks: usize,
    pub tokens: usize,
    pub min_tokens: usize,
    pub mean_tokens: f64,
    pub max_tokens: usize,
}

/// The chunks of a corpus, in document order, and their statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Chunked {
    pub chunks: Vec<Chunk>,
    pub stats: ChunkStats,
}

/// Chunks every document of `corpus`, in parallel over documents.
pub fn chunk_documents(
    corpus: &Corpus,
    tokenizer: &Tokenizer,
    options: ChunkOptions,
    reporter: &dyn CorpusReporter,
) -> Result<Chunked, CorpusError> {
    let options = options.validate()?;
    // Truncation would silently cut a section to the model's window and padding would add
    // tokens; a model's tokenizer.json often sets both for inference.
    let mut tokenizer = tokenizer.clone();
    tokenizer
        .with_truncation(None)
        .expect("tokenizers only rejects truncation parameters, and there are none");
    tokenizer.with_padding(None);

    let total = corpus.documents.len();
    let done = AtomicUsize::new(0);
    let per_document: Vec<Vec<Chunk>> = corpus
        .documents
        .par_iter()
        .map(|document| {
            let chunks = chunk_document(document, &tokenizer, options);
            reporter.on_progress(
                Phase::Chunk,
                done.fetch_add(1, Ordering::Relaxed) + 1,
                total,
            );
            chunks
        })
        .collect::<Result<_, _>>()?;

    let mut read = corpus.stats.clone();
    let mut documents_chunked = 0;
    let mut chunks = Vec::new();
    for (document, document_chunks) in corpus.documents.iter().zip(per_document) {
        if document_chunks.is_empty() {
            let skip = Skip {
                location: document.doc_id.clone(),
                reason: SkipReason::Empty,
                detail: "no text the tokenizer turns into tokens".to_owned(),
            };
            read.record_skip(&skip, reporter);
            continue;
        }
        documents_chunked += 1;
        chunks.extend(document_chunks);
    }
    let mut stats = ChunkStats {
        documents_seen: read.documents_seen,
        documents_chunked,
        skipped: read.skipped,
        skipped_examples: read.skipped_examples,
        lossy_utf8: read.lossy_utf8,
        ..ChunkStats::default()
    };
    stats.chunks = chunks.len();
    stats.tokens = chunks.iter().map(|c| c.n_tokens).sum();
    stats.min_tokens = chunks.iter().map(|c| c.n_tokens).min().unwrap_or(0);
    stats.max_tokens = chunks.iter().map(|c| c.n_tokens).max().unwrap_or(0);
    if !chunks.is_empty() {
        stats.mean_tokens = stats.tokens as f64 / chunks.len() as f64;
    }
    Ok(Chunked { chunks, stats })
}

/// The text under one heading: paragraphs joined by blank lines, and where each one lies.
#[derive(Debug)]
struct Section {
    title: String,
    text: String,
    paragraphs: Vec<Range<usize>>,
}

impl Section {
    fn new(title: String) -> Self {
        Self {
            title,
            text: String::new(),
            paragraphs: Vec::new(),
        }
    }

    fn push(&mut self, paragraph: &str) {
        if !self.text.is_empty() {
            self.text.push_str("\n\n");
        }
        let start = self.text.len();
        self.text.push_str(paragraph);
        self.paragraphs.push(start..self.text.len());
    }
}

fn sections(document: &Document) -> Vec<Section> {
    let mut path: Vec<(u8, &str)> = Vec::new();
    let mut sections = vec![Section::new(document.title.clone())];
    for block in &document.blocks {
        match block {
            Block::Heading { level, text } => {
                path.retain(|(outer, _)| outer < level);
                path.push((*level, text));
                let title: Vec<&str> = path.iter().map(|(_, text)| *text).collect();
                sections.push(Section::new(title.join(" > ")));
            }
            Block::Paragraph { text } => sections
                .last_mut()
                .expect("sections starts with the untitled one")
                .push(text),
        }
    }
    sections.retain(|s| !s.paragraphs.is_empty());
    sections
}

fn chunk_document(
    document: &Document,
    tokenizer: &Tokenizer,
    options: ChunkOptions,
) -> Result<Vec<Chunk>, CorpusError> {
    let sections = sections(document);
    let mut occurrences: HashMap<(&str, &str), usize> = HashMap::new();
    let mut chunks = Vec::new();
    for section in &sections {
        let offsets =
            token_offsets(tokenizer, &section.text).map_err(|e| CorpusError::Tokenize {
                doc_id: document.doc_id.clone(),
                message: e.to_string(),
            })?;
        for piece in pack_section(section, &offsets, options) {
            let text = &section.text[piece.bytes];
            let occurrence = occurrences.entry((&section.title, text)).or_default();
            chunks.push(Chunk {
                id: chunk_id(&document.doc_id, &section.title, text, *occurrence),
                doc_id: document.doc_id.clone(),
                source: document.source.clone(),
                title: section.title.clone(),
                text: text.to_owned(),
                n_tokens: piece.n_tokens,
            });
            *occurrence += 1;
        }
    }
    Ok(chunks)
}

/// Text encoded in one call at most, in bytes.
const ENCODE_SLICE: usize = 64 << 10;

/// The byte offsets of `text`'s tokens, encoded a slice of at most [`ENCODE_SLICE`] bytes at a
/// time, each cut just before whitespace, so the tokens are those of the whole text (every
/// pre-tokenizer in use splits at whitespace, and byte-level BPE keeps a space with the word
/// after it). A tokenizer's encoding of a whole text holds per byte and per token far more than
/// the offsets kept here: a 20 MB one-line document took 1.97 GB encoded at once.
fn token_offsets(tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Vec<(usize, usize)>> {
    let mut offsets = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = text.len();
        if end - start > ENCODE_SLICE {
            let limit = text.floor_char_boundary(start + ENCODE_SLICE);
            end = text[start..limit]
                .rfind(char::is_whitespace)
                .map(|i| start + i)
                .filter(|&i| i > start)
                .unwrap_or(limit);
        }
        let encoding = tokenizer.encode(&text[start..end], false)?;
        offsets.extend(
            encoding
                .get_offsets()
                .iter()
                .map(|&(a, b)| (start + a, start + b)),
        );
        start = end;
    }
    Ok(offsets)
}

fn chunk_id(doc_id: &str, title: &str, text: &str, occurrence: usize) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in [doc_id, title, text] {
        hasher.update(part.as_bytes());
        hasher.update(b"\0");
    }
    hasher.update(&(occurrence as u64).to_le_bytes());
    let mut id = hasher.finalize().to_hex().to_string();
    id.truncate(16);
    id
}

/// A chunk-to-be: where its text lies in the section, and its token count.
#[derive(Debug, PartialEq, Eq)]
struct Piece {
    bytes: Range<usize>,
    n_tokens: usize,
}

/// The token positions of a section's text.
struct Tokens<'a> {
    offsets: &'a [(usize, usize)],
}

impl Tokens<'_> {
    /// The index of the first token that starts at or after `byte`.
    fn at_byte(&self, byte: usize) -> usize {
        self.offsets.partition_point(|&(start, _)| start < byte)
    }

    /// Whether whitespace separates token `t` from the one before it.
    fn starts_word(&self, t: usize) -> bool {
        t == 0 || self.offsets[t].0 > self.offsets[t - 1].1
    }
}

fn pack_section(
    section: &Section,
    offsets: &[(usize, usize)],
    options: ChunkOptions,
) -> Vec<Piece> {
    let tokens = Tokens { offsets };
    let paragraph_tokens: Vec<Range<usize>> = section
        .paragraphs
        .iter()
        .map(|bytes| tokens.at_byte(bytes.start)..tokens.at_byte(bytes.end))
        .collect();
    let mut pieces = Vec::new();
    // The first and last paragraph of the chunk being packed.
    let mut open: Option<(usize, usize)> = None;
    let close = |open: Option<(usize, usize)>, pieces: &mut Vec<Piece>| {
        if let Some((first, last)) = open {
            pieces.push(Piece {
                bytes: section.paragraphs[first].start..section.paragraphs[last].end,
                n_tokens: paragraph_tokens[last].end - paragraph_tokens[first].start,
            });
        }
    };
    for (p, range) in paragraph_tokens.iter().enumerate() {
        if range.is_empty() {
            continue;
        }
        if range.len() > options.max_tokens {
            close(open.take(), &mut pieces);
            split_paragraph(
                &section.text,
                section.paragraphs[p].clone(),
                range.clone(),
                &tokens,
                options,
                &mut pieces,
            );
            continue;
        }
        open = match open {
            Some((first, _)) if range.end - paragraph_tokens[first].start <= options.max_tokens => {
                Some((first, p))
            }
            _ => {
                close(open, &mut pieces);
                Some((p, p))
            }
        };
    }
    close(open, &mut pieces);
    pieces
}

/// Splits one paragraph longer than `max_tokens` (see the module doc, rule 3).
fn split_paragraph(
    text: &str,
    bytes: Range<usize>,
    range: Range<usize>,
    tokens: &Tokens<'_>,
    options: ChunkOptions,
    pieces: &mut Vec<Piece>,
) {
    let mut sentence_ends: Vec<usize> = sentence_ends(&text[bytes.clone()])
        .into_iter()
        .map(|end| tokens.at_byte(bytes.start + end))
        .filter(|&t| t > range.start && t <= range.end)
        .collect();
    sentence_ends.dedup();
    let byte_at = |t: usize| match t {
        t if t == range.start => bytes.start,
        t if t == range.end => bytes.end,
        t => tokens.offsets[t].0,
    };
    let max = options.max_tokens;
    let mut start = range.start;
    loop {
        let limit = start + max;
        let end = if limit >= range.end {
            range.end
        } else if let Some(&end) = sentence_ends
            .iter()
            .rev()
            .find(|&&e| e > start && e <= limit)
        {
            end
        } else {
            (start + max / 2 + 1..=limit)
                .rev()
                .find(|&t| tokens.starts_word(t))
                .unwrap_or(limit)
        };
        let piece_text = &text[byte_at(start)..byte_at(end)];
        let trimmed = piece_text.trim_end();
        if !trimmed.is_empty() {
            pieces.push(Piece {
                bytes: byte_at(start)..byte_at(start) + trimmed.len(),
                n_tokens: end - start,
            });
        }
        if end == range.end {
            break;
        }
        let back = end.saturating_sub(options.overlap);
        let next = (back..end).find(|&t| tokens.starts_word(t)).unwrap_or(end);
        start = if next > start { next } else { end };
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use fs_err as fs;

    use super::*;
    use crate::corpus::source::tests::Recorder;
    use crate::corpus::{FileFilter, Source, read_source};

    /// One token per word or run of punctuation, `~` dropped; `[CLS]`/`[SEP]` added, and truncation and
    /// padding set as a model's tokenizer.json sets them, so the tests prove chunking ignores all
    /// three.
    const WORD_TOKENIZER: &str = r#"{
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 16}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 3, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [],
        "normalizer": {"type": "Replace", "pattern": {"String": "~"}, "content": ""},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1]},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3},
                  "unk_token": "[UNK]"}
    }"#;

    fn word_tokenizer() -> Tokenizer {
        Tokenizer::from_str(WORD_TOKENIZER).expect("a valid tokenizer.json")
    }

    fn heading(level: u8, text: &str) -> Block {
        Block::Heading {
            level,
            text: text.to_owned(),
        }
    }

    fn paragraph(text: &str) -> Block {
        Block::Paragraph {
            text: text.to_owned(),
        }
    }

    fn chunk(blocks: Vec<Block>, max_tokens: usize, overlap: usize) -> Vec<Chunk> {
        let corpus = Corpus {
            documents: vec![Document {
                doc_id: "notes.md".to_owned(),
                source: "notes.md".to_owned(),
                title: "notes".to_owned(),
                blocks,
            }],
            ..Corpus::default()
        };
        let options = ChunkOptions {
            max_tokens,
            overlap,
        };
        chunk_documents(&corpus, &word_tokenizer(), options, &())
            .expect("chunks")
            .chunks
    }

    fn texts(chunks: &[Chunk]) -> Vec<(&str, usize)> {
        chunks
            .iter()
            .map(|c| (c.text.as_str(), c.n_tokens))
            .collect()
    }

    #[test]
    fn headings_start_chunks_titled_by_their_path() {
        let chunks = chunk(
            vec![
                paragraph("Intro words here."),
                heading(1, "Guide"),
                paragraph("Guide text."),
                heading(2, "Install"),
                heading(3, "Linux"),
                paragraph("Use apt."),
                heading(2, "Usage"),
                paragraph("Run it."),
                heading(1, "Empty"),
            ],
            100,
            0,
        );
        let titles: Vec<&str> = chunks.iter().map(|c| c.title.as_str()).collect();
        assert_eq!(
            titles,
            vec!["notes", "Guide", "Guide > Install > Linux", "Guide > Usage"]
        );
        assert_eq!(
            texts(&chunks),
            vec![
                ("Intro words here.", 4),
                ("Guide text.", 3),
                ("Use apt.", 3),
                ("Run it.", 3)
            ]
        );
    }

    #[test]
    fn whole_paragraphs_pack_while_they_fit_without_special_tokens() {
        // 12 tokens in the section: truncation at 8 would lose the third paragraph, and counting
        // [CLS]/[SEP] would make the first chunk 10 > 9.
        let chunks = chunk(
            vec![
                paragraph("one two three."),
                paragraph("four five six."),
                paragraph("seven eight nine."),
            ],
            9,
            2,
        );
        assert_eq!(
            texts(&chunks),
            vec![
                ("one two three.\n\nfour five six.", 8),
                ("seven eight nine.", 4)
            ]
        );
    }

    #[test]
    fn a_long_paragraph_splits_at_sentences_carrying_the_overlap() {
        let sentences: Vec<String> = (1..=6).map(|i| format!("A{i} b{i} c{i} d{i}.")).collect();
        let chunks = chunk(vec![paragraph(&sentences.join(" "))], 12, 3);
        assert_eq!(
            texts(&chunks),
            vec![
                ("A1 b1 c1 d1. A2 b2 c2 d2.", 10),
                ("c2 d2. A3 b3 c3 d3.", 8),
                ("c3 d3. A4 b4 c4 d4.", 8),
                ("c4 d4. A5 b5 c5 d5.", 8),
                ("c5 d5. A6 b6 c6 d6.", 8),
            ]
        );
    }

    #[test]
    fn a_sentence_longer_than_max_splits_at_words() {
        let words: Vec<String> = (1..=25).map(|i| format!("w{i}")).collect();
        let chunks = chunk(
            vec![
                paragraph("Short one."),
                paragraph(&words.join(" ")),
                paragraph("Tail."),
            ],
            10,
            2,
        );
        let span = |from: usize, to: usize| words[from - 1..to].join(" ");
        assert_eq!(
            texts(&chunks),
            vec![
                ("Short one.", 3),
                (span(1, 10).as_str(), 10),
                (span(9, 18).as_str(), 10),
                (span(17, 25).as_str(), 9),
                ("Tail.", 2),
            ]
        );
    }

    #[test]
    fn options_must_leave_room_for_progress() {
        let corpus = Corpus::default();
        for (max_tokens, overlap) in [(0, 0), (8, 8), (8, 9)] {
            let options = ChunkOptions {
                max_tokens,
                overlap,
            };
            assert!(matches!(
                chunk_documents(&corpus, &word_tokenizer(), options, &()),
                Err(CorpusError::BadOptions { .. })
            ));
        }
    }

    fn ids_by_document(root: &std::path::Path) -> BTreeMap<String, Vec<String>> {
        let source = Source::from_path(root, FileFilter::default()).expect("folder");
        let corpus = read_source(&source, &()).expect("reads");
        let options = ChunkOptions {
            max_tokens: 64,
            overlap: 0,
        };
        let mut ids: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for chunk in chunk_documents(&corpus, &word_tokenizer(), options, &())
            .expect("chunks")
            .chunks
        {
            ids.entry(chunk.doc_id).or_default().push(chunk.id);
        }
        ids
    }

    #[test]
    fn chunk_ids_change_only_with_their_own_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        fs::write(
            root.join("a.md"),
            "# T\n\nSame text.\n\n# T\n\nSame text.\n",
        )
        .expect("a");
        fs::write(
            root.join("b.md"),
            "# One\n\nKept.\n\n# Two\n\nEdited later.\n",
        )
        .expect("b");
        fs::create_dir(root.join("sub")).expect("mkdir");
        fs::write(root.join("sub/c.txt"), "Plain.\n").expect("c");
        let before = ids_by_document(root);

        let a = &before["a.md"];
        assert_eq!(a.len(), 2);
        assert_ne!(
            a[0], a[1],
            "identical chunks in one document get distinct ids"
        );
        assert!(
            a.iter()
                .all(|id| id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        assert_eq!(before, ids_by_document(root), "ids are deterministic");

        fs::write(
            root.join("b.md"),
            "# One\n\nKept.\n\n# Two\n\nEdited now.\n",
        )
        .expect("b");
        fs::write(root.join("0-first.md"), "New file sorted first.\n").expect("new");
        let after = ids_by_document(root);
        assert_eq!(after["a.md"], before["a.md"]);
        assert_eq!(after["sub/c.txt"], before["sub/c.txt"]);
        assert_eq!(
            after["b.md"][0], before["b.md"][0],
            "the unedited section keeps its id"
        );
        assert_ne!(after["b.md"][1], before["b.md"][1]);
        assert_eq!(after.len(), 4);

        // The same text in another file is another chunk.
        fs::write(root.join("a-copy.md"), "# T\n\nSame text.\n").expect("copy");
        assert_ne!(ids_by_document(root)["a-copy.md"][0], before["a.md"][0]);
    }

    #[test]
    fn stats_add_chunking_to_what_reading_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::write(dir.path().join("a.md"), "one two three.\n\nfour.\n").expect("a");
        fs::write(dir.path().join("b.md"), "# Only heading\n").expect("b");
        // Only a character the tokenizer drops: read, but no chunk.
        fs::write(dir.path().join("c.txt"), "~~~\n").expect("c");
        let source = Source::from_path(dir.path(), FileFilter::default()).expect("folder");
        let recorder = Recorder::default();
        let corpus = read_source(&source, &recorder).expect("reads");
        let options = ChunkOptions {
            max_tokens: 4,
            overlap: 0,
        };
        let chunked =
            chunk_documents(&corpus, &word_tokenizer(), options, &recorder).expect("chunks");
        let stats = &chunked.stats;
        assert_eq!(stats.documents_seen, 3);
        assert_eq!(stats.documents_chunked, 1);
        assert_eq!(stats.skipped[&SkipReason::Empty], 2);
        assert_eq!(
            stats.skipped_examples[&SkipReason::Empty],
            vec!["b.md", "c.txt"]
        );
        assert_eq!((stats.chunks, stats.tokens), (2, 6));
        assert_eq!((stats.min_tokens, stats.max_tokens), (2, 4));
        assert!((stats.mean_tokens - 3.0).abs() < 1e-12);
        assert!(
            recorder
                .progress
                .lock()
                .expect("not poisoned")
                .contains(&(Phase::Chunk, 2, 2))
        );
        let json = serde_json::to_value(stats).expect("serialises");
        assert_eq!(json["skipped"]["empty"], 2);
    }

    /// With all-MiniLM-L6-v2's own tokenizer (which truncates and pads to 128): every chunk fits,
    /// its count is what a fresh encoding of its text gives, and the text is all there.
    #[test]
    fn minilm_counts_match_a_fresh_encoding() {
        let tokenizer = Tokenizer::from_file(crate::testutil::minilm_dir().join("tokenizer.json"))
            .expect("MiniLM tokenizer loads");
        let sentence = "Python's garbage collector frees reference cycles, e.g. a list that \
                        contains itself; CPython also counts references. ";
        let long = sentence.repeat(14);
        let markdown = format!(
            "# FAQ\n\nWhy does Python use indentation?\n\n## Memory\n\n{long}\n\nShort closing \
             paragraph about `gc.collect()`.\n"
        );
        let blocks = crate::corpus::markup::markdown_blocks(&markdown);
        let corpus = Corpus {
            documents: vec![Document {
                doc_id: "faq.md".to_owned(),
                source: "faq.md".to_owned(),
                title: "faq".to_owned(),
                blocks,
            }],
            ..Corpus::default()
        };
        let options = ChunkOptions {
            max_tokens: 64,
            overlap: 8,
        };
        let chunked = chunk_documents(&corpus, &tokenizer, options, &()).expect("chunks");
        let mut fresh = tokenizer.clone();
        fresh.with_truncation(None).expect("no truncation");
        fresh.with_padding(None);
        let mut words_seen = 0;
        for chunk in &chunked.chunks {
            let count = fresh
                .encode(chunk.text.as_str(), false)
                .expect("encodes")
                .len();
            assert_eq!(chunk.n_tokens, count, "{chunk:?}");
            assert!(chunk.n_tokens <= 64);
            let with_specials = fresh.encode(chunk.text.as_str(), true).expect("encodes");
            assert_eq!(
                with_specials.len(),
                count + 2,
                "[CLS] and [SEP] are not counted"
            );
            words_seen += chunk.text.matches("garbage").count();
        }
        // The long paragraph (14 sentences, ~300 tokens) became several overlapping pieces,
        // each ending at a sentence, so every sentence appears at least once.
        let memory: Vec<&Chunk> = chunked
            .chunks
            .iter()
            .filter(|c| c.title == "FAQ > Memory")
            .collect();
        assert!(memory.len() >= 5, "{}", memory.len());
        assert!(words_seen >= 14);
        assert!(
            memory[..memory.len() - 1]
                .iter()
                .all(|c| c.text.ends_with("references."))
        );
        assert_eq!(chunked.chunks[0].title, "FAQ");
        assert_eq!(
            chunked.chunks.last().map(|c| c.text.as_str()),
            Some("Short closing paragraph about `gc.collect()`.")
        );
    }

    /// The brief's speed bar: 5,000 markdown files of about 2 KB chunk in seconds. Ignored by
    /// default (it measures, and CI machines vary); run with
    /// `cargo test --lib corpus::chunk::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run by hand"]
    #[expect(
        clippy::print_stderr,
        reason = "the figures are the point of this test"
    )]
    fn throughput_of_5000_markdown_files() {
        use rand::{Rng, SeedableRng};

        const WORDS: &[&str] = &[
            "the",
            "retention",
            "policy",
            "requires",
            "encrypted",
            "backups",
            "of",
            "every",
            "database",
            "and",
            "a",
            "restore",
            "drill",
            "each",
            "quarter",
            "operators",
            "must",
            "record",
            "which",
            "snapshot",
            "was",
            "used",
            "including",
            "its",
            "checksum",
            "storage",
            "tier",
            "replicas",
            "failover",
            "region",
            "latency",
            "budget",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let sentence = |rng: &mut rand_chacha::ChaCha8Rng| {
            let n = rng.random_range(8..20);
            let words: Vec<&str> = (0..n)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            let mut s = words.join(" ");
            s[..1].make_ascii_uppercase();
            s + "."
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let mut bytes = 0;
        for file in 0..5000 {
            let mut text = format!("# Runbook {file}\n\n");
            let mut section = 0;
            while text.len() < 2000 {
                if text.len() > 600 * (section + 1) {
                    section += 1;
                    text += &format!("\n## Step {section}\n\n");
                }
                let sentences: Vec<String> = (0..rng.random_range(2..5))
                    .map(|_| sentence(&mut rng))
                    .collect();
                text += &sentences.join(" ");
                text += "\n\n";
            }
            bytes += text.len();
            let folder = dir.path().join(format!("team-{}", file % 50));
            fs::create_dir_all(&folder).expect("mkdir");
            fs::write(folder.join(format!("runbook-{file}.md")), text).expect("write");
        }
        let tokenizer = Tokenizer::from_file(crate::testutil::minilm_dir().join("tokenizer.json"))
            .expect("MiniLM tokenizer loads");
        let options = ChunkOptions {
            max_tokens: 256,
            overlap: 32,
        };
        let started = std::time::Instant::now();
        let source = Source::from_path(dir.path(), FileFilter::default()).expect("folder");
        let corpus = read_source(&source, &()).expect("reads");
        let read = started.elapsed();
        let chunked = chunk_documents(&corpus, &tokenizer, options, &()).expect("chunks");
        let total = started.elapsed();
        let files_per_second = 5000.0 / total.as_secs_f64();
        eprintln!(
            "5000 files, {:.1} MB, {} threads: read {:.2} s, chunk {:.2} s, total {:.2} s = \
             {files_per_second:.0} files/s; {} chunks, {} tokens",
            bytes as f64 / 1e6,
            rayon::current_num_threads(),
            read.as_secs_f64(),
            (total - read).as_secs_f64(),
            total.as_secs_f64(),
            chunked.stats.chunks,
            chunked.stats.tokens,
        );
        assert_eq!(chunked.stats.documents_chunked, 5000);
        assert!(total.as_secs_f64() < 10.0, "took {total:?}");
    }
}
