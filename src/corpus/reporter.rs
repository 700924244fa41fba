//! How reading and chunking tell their caller what happens, without knowing who listens.

use super::skip::Skip;

/// Which pass a progress report counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading and extracting files (or JSONL records).
    Read,
    /// Tokenizing and cutting documents into chunks.
    Chunk,
}

/// Receives events while a corpus is read and chunked. Called from worker threads, hence `Sync`;
/// every method has an empty default so a caller implements only what it shows.
///
/// A trait rather than three closures: the caller (a stage) usually forwards all of them to one
/// sink, and a trait object keeps the signatures of `read_source`/`chunk_documents` short.
pub trait CorpusReporter: Sync {
    /// A file or record was left out.
    fn on_skip(&self, _skip: &Skip) {}
    /// A file had a few invalid UTF-8 sequences, replaced by U+FFFD.
    fn on_lossy_utf8(&self, _location: &str, _invalid_sequences: usize) {}
    /// `done` of `total` items of `phase` are finished. Calls may arrive out of order.
    fn on_progress(&self, _phase: Phase, _done: usize, _total: usize) {}
}

/// Reports nothing.
impl CorpusReporter for () {}
