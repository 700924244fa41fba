//! Why a document was left out of the corpus.

use serde::{Deserialize, Serialize};

/// The reason a file (or JSONL record) was skipped. Unit variants, so that they key the counts in
/// [`super::ChunkStats::skipped`]; the specifics go in [`Skip::detail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// NUL bytes, or mostly bytes that no text file holds.
    Binary,
    /// More than one invalid UTF-8 sequence per 1,000 bytes: another encoding, not damage.
    InvalidUtf8,
    /// The file system refused: permissions, a dangling link, a loop of links.
    Unreadable,
    /// A PDF that needs a password to open.
    EncryptedPdf,
    /// A PDF whose pages hold no text (scanned images).
    PdfWithoutText,
    /// The parser gave up on the file (a malformed PDF or HTML).
    ExtractionFailed,
    /// Nothing but whitespace after extraction.
    Empty,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Binary => "binary file",
            Self::InvalidUtf8 => "not UTF-8 text",
            Self::Unreadable => "unreadable",
            Self::EncryptedPdf => "encrypted PDF",
            Self::PdfWithoutText => "PDF without extractable text",
            Self::ExtractionFailed => "extraction failed",
            Self::Empty => "empty after extraction",
        })
    }
}

/// One skipped file or record, as the reporter is told of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    /// The relative path, or `corpus.jsonl:LINE` for a JSONL record.
    pub location: String,
    pub reason: SkipReason,
    /// What exactly was wrong, for a warning (`NUL byte at offset 12`).
    pub detail: String,
}

/// What an extractor returns instead of text: the reason and its specifics, to which reading adds
/// the location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) reason: SkipReason,
    pub(crate) detail: String,
}

impl Rejection {
    pub(crate) fn new(reason: SkipReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}
