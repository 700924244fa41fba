//! Errors that stop reading or chunking a corpus. A single unreadable file is not one of them: it
//! becomes a [`super::Skip`], counted and reported, and the rest of the corpus goes on.

use std::path::PathBuf;

/// Why a corpus could not be read or chunked as a whole.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("corpus folder `{}` does not exist", path.display())]
    RootMissing { path: PathBuf },
    #[error("corpus source `{}` is neither a folder nor a `.jsonl` file", path.display())]
    NotASource { path: PathBuf },
    #[error("invalid {which} glob `{glob}`: {message}")]
    BadGlob {
        which: &'static str,
        glob: String,
        message: String,
    },
    #[error("`{}` line {line}: {message}", path.display())]
    BadJsonlLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("`{}` line {line}: `_id` `{id}` already appeared on line {first_line}", path.display())]
    DuplicateId {
        path: PathBuf,
        line: usize,
        id: String,
        first_line: usize,
    },
    #[error(
        "`max_tokens` is {max_tokens} and `overlap` is {overlap}: `overlap` must be smaller than `max_tokens`, which must be at least 1"
    )]
    BadOptions { max_tokens: usize, overlap: usize },
    #[error("the tokenizer failed on `{doc_id}`: {message}")]
    Tokenize { doc_id: String, message: String },
    /// From `fs_err`, whose message names the path.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}
