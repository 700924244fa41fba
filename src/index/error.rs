//! Errors of building and searching the BM25 and dense indexes.

use std::path::PathBuf;

/// Why an index could not be built or searched.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("document id `{id}` appears twice, at positions {first} and {second}")]
    DuplicateId {
        id: String,
        first: usize,
        second: usize,
    },
    #[error("index directory `{}` is not empty", path.display())]
    DirectoryNotEmpty { path: PathBuf },
    #[error("I/O error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tantivy failed while {action}")]
    Tantivy {
        action: &'static str,
        #[source]
        source: tantivy::TantivyError,
    },
    #[error("reading the BM25 index failed")]
    Read {
        #[source]
        source: std::io::Error,
    },
    #[error("the BM25 index is not laid out in input order: {why}")]
    Layout { why: String },
    #[error("embedding dimension must be at least 1")]
    ZeroDimension,
    #[error("{what} holds {len} floats, not a whole number of rows of dimension {dim}")]
    RaggedMatrix {
        what: &'static str,
        len: usize,
        dim: usize,
    },
    #[error("document embedding {row} has L2 norm {norm}, expected 1 (normalise before indexing)")]
    NotNormalized { row: usize, norm: f32 },
    #[error("embedding {row} holds a value that is not finite")]
    NotFinite { row: usize },
    #[error("embedding {row} is all zeros in its first {dim} dimensions and cannot be normalised")]
    NotNormalizable { row: usize, dim: usize },
    #[error("cannot truncate embeddings of dimension {dim} to {requested}")]
    BadTruncation { dim: usize, requested: usize },
    #[error("matrix multiply failed")]
    Matmul(#[source] candle_core::Error),
}
