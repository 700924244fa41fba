//! Search indexes over a list of chunks: lexical BM25 ([`Bm25Index`], on tantivy) and exact dense
//! search over normalised embeddings ([`DenseIndex`]). The mine stage draws hard negatives from
//! both, the judge stage checks that a query finds its own chunk, and the evaluate stage ranks the
//! corpus with each system. Both return [`Hit`]s that name a document by its position in the
//! caller's list, ranked by score with ties broken by position, so a rerun gives the same order.
//! Long batch searches report progress through a closure the caller passes; nothing here knows
//! about recipes, stages or the terminal.

pub mod bm25;
pub mod dense;
pub mod error;
mod top_k;

use serde::{Deserialize, Serialize};

pub use bm25::Bm25Index;
pub use dense::{DenseIndex, truncate_and_normalize};
pub use error::IndexError;

/// One retrieved document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// Position of the document in the list the index was built from.
    pub doc: usize,
    /// BM25 score, or cosine similarity for dense search. Higher is better.
    pub score: f32,
}

/// Called from worker threads with the number of queries finished since the previous call; the
/// counts add up to the number of queries. A stage forwards them to its progress bar.
pub type OnProgress<'a> = &'a (dyn Fn(usize) + Sync);
