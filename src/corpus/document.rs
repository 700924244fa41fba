//! A document as extraction leaves it: a flat list of headings and paragraphs.

use serde::{Deserialize, Serialize};

/// One block of a document, in reading order.
///
/// Extraction keeps only the structure chunking needs (where a section starts, what it is called,
/// where a paragraph ends) rather than a full markup tree: every format (markdown, reStructuredText,
/// HTML, PDF, plain text) lowers to these two kinds, so one chunker serves them all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Block {
    /// A section heading; `level` 1 is the outermost.
    Heading { level: u8, text: String },
    /// A paragraph with its whitespace collapsed to single spaces.
    Paragraph { text: String },
}

/// A document read from a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// Stable identity: the path relative to the corpus folder with `/` separators, or the
    /// BEIR `_id` of a JSONL record.
    pub doc_id: String,
    /// Where it came from, for people: the relative path, or the record's `source` field (else the
    /// JSONL file's name).
    pub source: String,
    /// The title of text outside any heading: the file stem, or the record's `title`.
    pub title: String,
    pub blocks: Vec<Block>,
}
