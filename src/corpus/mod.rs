//! Reading and chunking documents: the work behind the chunk stage.
//!
//! [`read_source`] walks a folder (include/exclude globs, deterministic order) or reads a BEIR
//! `corpus.jsonl`, and extracts each file in parallel into a [`Document`] of headings and
//! paragraphs: markdown and plain text by lines, reStructuredText by its title adornments, HTML
//! through `html2text`, PDF through `pdf-extract`. A file that cannot be read (binary, not UTF-8,
//! encrypted, no text, unreadable) is skipped with a [`SkipReason`] and reported, never fatal.
//! [`chunk_documents`] then cuts documents into [`Chunk`]s by the base model's tokenizer along
//! their structure, with ids that depend only on each chunk's own document and text. Events go to
//! a [`CorpusReporter`]; nothing here knows about recipes, the executor or the terminal.

mod chunk;
mod decode;
mod document;
mod error;
mod extract;
mod html;
mod markup;
mod pdf;
mod reporter;
mod sentence;
mod skip;
mod source;

pub use chunk::{Chunk, ChunkOptions, ChunkStats, Chunked, chunk_documents};
pub use document::{Block, Document};
pub use error::CorpusError;
pub use reporter::{CorpusReporter, Phase};
pub(crate) use sentence::sentence_ends;
pub use skip::{Skip, SkipReason};
pub use source::{
    Corpus, DEFAULT_EXCLUDE, DEFAULT_INCLUDE, FileFilter, Listing, MAX_SKIP_EXAMPLES, ReadStats,
    Source, list_files, read_source,
};
